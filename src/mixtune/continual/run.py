"""``mixtune proxymix run``: every sequence of a continual config, with its mixer.

With ``mixer: {name: proxymix, policy: controller}`` the frozen controller's proxy
vulnerability ranking is first checked against a short probe on this (target) model
(``transfer``); when the rank correlation is below the threshold the run warns and uses fixed
replay (``replay_ratio``) instead. Writes ``summary.json`` / ``summary.md`` in ``output_dir``
(one sub-directory per sequence when there are several), including the policy-learning cost
ratio: the controller's proxy learning cost against the same number of episodes on this model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mixtune.config import MethodConfig
from mixtune.continual.config import ContinualConfig
from mixtune.continual.driver import run_sequence, warmup
from mixtune.mixers.proxymix import controller as ctl


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def run(cc: ContinualConfig, echo=print) -> dict:
    out = Path(cc.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    mixer, report, info = cc.mixer, {}, None
    start = warmup(cc, out / "warmup")
    params = dict(mixer.params)
    if mixer.name == "proxymix" and params.get("policy", "controller") == "controller":
        _, info = ctl.load(params.get("controller") or "", "mixer.controller")
        if cc.transfer.check:
            from mixtune.mixers.proxymix.transfer import check

            chk = report["transfer_check"] = check(cc, info, out / "transfer-check", start)
            shown = "inconclusive" if chk["value"] is None else f"{chk['value']:.2f}"
            echo(
                f"[proxymix] vulnerability rank correlation proxy vs target "
                f"({chk['statistic']}, {len(chk['items'])} items): {shown}"
            )
            if not chk["passed"]:
                echo(
                    f"[proxymix] WARNING: below the threshold {chk['threshold']}: the proxy's "
                    f"forgetting does not mirror this model's; falling back to fixed replay "
                    f"(replay_ratio={params.get('replay_ratio', 0.2)})"
                )
                mixer = MethodConfig("proxymix", {**params, "policy": "fixed"})
    orders = cc.orders()
    results = []
    for k, order in enumerate(orders):
        sdir = out if len(orders) == 1 else out / f"seq-{k + 1}-{'-'.join(order)}"
        res = run_sequence(cc, order, sdir, mixer=mixer, start_model=start)
        res.pop("records")
        results.append(res)
        saf = (res.get("safety") or {}).get("final")
        echo(
            f"[proxymix] {' > '.join(order)}: AA={_pct(res['average_accuracy'])} "
            f"F={_pct(res['forgetting'])} safety={_pct(saf)} ({sdir})"
        )
    report.update(
        {
            "mixer": {"name": mixer.name, **mixer.params},
            "sequences": [r["order"] for r in results],
            "average_accuracy": _mean([r["average_accuracy"] for r in results]),
            "forgetting": _mean([r["forgetting"] for r in results]),
            "safety": _mean([(r.get("safety") or {}).get("final") for r in results]),
            "loss_forgetting": _mean([r["loss_forgetting"] for r in results]),
            "cost": {
                "seconds": sum(r["cost"]["seconds"] for r in results),
                "train_flops": sum(r["cost"]["train_flops"] for r in results),
                "params": results[-1]["cost"]["params"],
            },
        }
    )
    if info is not None:
        report["policy_cost"] = policy_cost(info, report["cost"], len(results))
    (out / "summary.json").write_text(json.dumps(report, indent=1))
    (out / "summary.md").write_text(_markdown(report))
    echo(
        f"[proxymix] mean over {len(results)} sequence(s): "
        f"AA={_pct(report['average_accuracy'])} F={_pct(report['forgetting'])} "
        f"safety={_pct(report['safety'])}; summary in {out / 'summary.md'}"
    )
    return report


def policy_cost(info: dict, target_cost: dict, n_sequences: int) -> dict:
    """Proxy learning cost vs. the same number of episodes (continual runs) on this model."""
    meta = info.get("meta", {})
    cost, episodes = meta.get("cost", {}), meta.get("episodes", 0)
    per_seq_s = target_cost["seconds"] / n_sequences
    per_seq_f = target_cost["train_flops"] / n_sequences
    out = {
        "episodes": episodes,
        "proxy_seconds": cost.get("seconds"),
        "proxy_train_flops": cost.get("train_flops"),
        "proxy_params": meta.get("proxy_params"),
        "target_params": target_cost["params"],
        "target_rl_seconds_estimate": episodes * per_seq_s,
        "target_rl_train_flops_estimate": episodes * per_seq_f,
    }
    if cost.get("seconds"):
        out["ratio_seconds"] = out["target_rl_seconds_estimate"] / cost["seconds"]
    if cost.get("train_flops"):
        out["ratio_flops"] = out["target_rl_train_flops_estimate"] / cost["train_flops"]
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _markdown(r: dict) -> str:
    lines = [
        "# Continual summary",
        "",
        f"mixer: `{r['mixer']}`",
        "",
        f"- sequences: {[' > '.join(s) for s in r['sequences']]}",
        f"- average accuracy: {_pct(r['average_accuracy'])}",
        f"- forgetting: {_pct(r['forgetting'])} points",
        f"- safety: {_pct(r['safety'])}",
    ]
    if "transfer_check" in r:
        c = r["transfer_check"]
        lines.append(
            f"- transfer check ({c['statistic']}): {c['value']} over {c['items']} "
            f"-> {'controller used' if c['passed'] else 'fell back to fixed replay'}"
        )
    if "policy_cost" in r:
        c = r["policy_cost"]
        lines.append(
            f"- policy-learning cost: proxy {c['proxy_seconds']} s for {c['episodes']} "
            f"episodes; the same RL on this model ~{c['target_rl_seconds_estimate']:.0f}"
            f" s (ratio {c.get('ratio_seconds', float('nan')):.1f}x by time, "
            f"{c.get('ratio_flops', float('nan')):.1f}x by training FLOPs)"
        )
    return "\n".join(lines) + "\n"
