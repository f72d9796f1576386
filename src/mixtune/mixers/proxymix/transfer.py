"""The pre-transfer check ("forgetting mirroring", note §2.2 P9, [PROPOSAL]).

The paper's hypothesis [SRC abstract]: which tasks are most vulnerable to forgetting is largely
the same across model scales, even when loss magnitudes differ. Before a frozen controller is
used on a target, the same short probe -- every sequence with fixed replay for
``transfer.probe_steps`` steps per stage -- runs on the proxy (at the end of ``learn``) and on
the target. Vulnerability of task i = its peak loss increase after it was learned,
max_{s > i} L[s][i] / L[i][i] - 1 (safety: relative to the start), averaged over sequences. The
rankings are compared with Spearman's rho (or Kendall's tau); below ``transfer.threshold`` the
run warns and falls back to fixed replay. With fewer than 3 shared items the check is
inconclusive (reported, and the controller is used).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from mixtune.config import MethodConfig
from mixtune.continual.driver import run_sequence
from mixtune.mixers.proxymix.setting import ProxyMixSetting


def rank_correlation(
    a: dict, b: dict, statistic: str = "spearman"
) -> tuple[float | None, list[str]]:
    """Rank correlation of two {item: value} maps over their shared items (None if < 3)."""
    common = sorted(set(a) & set(b))
    if len(common) < 3:
        return None, common
    from scipy.stats import kendalltau, spearmanr

    x, y = [a[k] for k in common], [b[k] for k in common]
    r = (spearmanr(x, y) if statistic == "spearman" else kendalltau(x, y)).statistic
    return (None if r is None or math.isnan(r) else float(r)), common


def probe(cc: ProxyMixSetting, out: str | Path, start_model: str | None) -> dict:
    """Mean vulnerability per task (and safety) over a short fixed-replay run of each order."""
    cc = dataclasses.replace(cc, accuracy=False)  # the ranking is loss-based
    params = cc.mixer.params if cc.mixer.name == "proxymix" else {}
    mixer = MethodConfig(
        "proxymix",
        {
            **{k: v for k, v in params.items() if k not in ("controller", "explore_sigma")},
            "policy": "fixed",
        },
    )
    vul: dict[str, list[float]] = {}
    seconds = 0.0
    for k, order in enumerate(cc.orders()):
        res = run_sequence(
            cc,
            order,
            Path(out) / f"seq-{k + 1}",
            mixer=mixer,
            steps=cc.transfer.probe_steps,
            start_model=start_model,
        )
        seconds += res["cost"]["seconds"]
        for name, v in res["vulnerability"].items():
            vul.setdefault(name, []).append(v)
    return {"vulnerability": {k: float(np.mean(v)) for k, v in vul.items()}, "seconds": seconds}


def check(cc: ProxyMixSetting, info: dict, out: str | Path, start_model: str | None) -> dict:
    """Compare the controller's proxy ranking with the target's; ``passed`` says whether to
    use the controller."""
    proxy = info.get("vulnerability", {})
    target = probe(cc, out, start_model)
    r, common = rank_correlation(proxy, target["vulnerability"], cc.transfer.statistic)
    return {
        "statistic": cc.transfer.statistic,
        "value": r,
        "items": common,
        "threshold": cc.transfer.threshold,
        "proxy": proxy,
        "target": target["vulnerability"],
        "seconds": target["seconds"],
        "passed": r is None or r >= cc.transfer.threshold,
        "conclusive": r is not None,
    }
