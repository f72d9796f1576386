"""``mixtune proxymix run``: every sequence of the config, with ProxyMix's transfer safeguard.

With ``mixer: {name: proxymix, policy: controller}`` the frozen controller's proxy
vulnerability ranking is first checked against a short probe on this (target) model
(``transfer``, :mod:`mixtune.mixers.proxymix.transfer`); when the rank correlation is below the
threshold the run warns and uses fixed replay (``replay_ratio``) instead. Any other mixer runs
as configured. The summary (:func:`mixtune.continual.run.write_summary`) also holds the check
and the policy-learning cost ratio: the controller's proxy learning cost against the same
number of episodes on this model.
"""

from __future__ import annotations

from pathlib import Path

from mixtune.config import MethodConfig
from mixtune.continual.driver import warmup
from mixtune.continual.run import run_sequences, write_summary
from mixtune.mixers.proxymix import controller as ctl
from mixtune.mixers.proxymix import transfer
from mixtune.mixers.proxymix.setting import ProxyMixSetting


def run(px: ProxyMixSetting, echo=print) -> dict:
    out = Path(px.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    mixer, report, info = px.mixer, {}, None
    start = warmup(px, out / "warmup")
    params = dict(mixer.params)
    if mixer.name == "proxymix" and params.get("policy", "controller") == "controller":
        _, info = ctl.load(params.get("controller") or "", "mixer.controller")
        if px.transfer.check:
            chk = report["transfer_check"] = transfer.check(px, info, out / "transfer-check", start)
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
                mixer = fixed_replay(mixer)
    report.update(run_sequences(px, mixer, start, echo))
    if info is not None:
        report["policy_cost"] = policy_cost(info, report["cost"], len(report["sequences"]))
    write_summary(out, report, _notes(report), echo)
    return report


def fixed_replay(mixer: MethodConfig) -> MethodConfig:
    """The same ProxyMix options with the ``fixed`` policy: the transfer check's fallback."""
    return MethodConfig("proxymix", {**mixer.params, "policy": "fixed"})


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


def _notes(r: dict) -> list[str]:
    notes = []
    if "transfer_check" in r:
        c = r["transfer_check"]
        notes.append(
            f"transfer check ({c['statistic']}): {c['value']} over {c['items']} "
            f"-> {'controller used' if c['passed'] else 'fell back to fixed replay'}"
        )
    if "policy_cost" in r:
        c = r["policy_cost"]
        notes.append(
            f"policy-learning cost: proxy {c['proxy_seconds']} s for {c['episodes']} "
            f"episodes; the same RL on this model ~{c['target_rl_seconds_estimate']:.0f}"
            f" s (ratio {c.get('ratio_seconds', float('nan')):.1f}x by time, "
            f"{c.get('ratio_flops', float('nan')):.1f}x by training FLOPs)"
        )
    return notes
