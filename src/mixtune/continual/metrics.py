"""Continual-learning metrics of one sequence, and its JSON / markdown / plot outputs.

Standard definitions (note §2.2 P8; the paper's exact ones were not readable):

    a[s][i]   accuracy on task i after stage s (i <= s); L[s][i] its loss
    AA        = mean_i a[S-1][i]                          (average final accuracy)
    F         = mean_{i < S-1} (max_{i <= s < S-1} a[s][i] - a[S-1][i])   (final forgetting)
    safety    = accuracy on the safety domain after the last stage (its start value is kept)
    vulnerability_i = max_{s > i} L[s][i] / L[i][i] - 1   (safety: relative to the start loss)

Tasks whose domain has no accuracy are left out of AA and F (their losses are still reported,
with a loss-based forgetting: the relative increase of the final loss over the best one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mixtune.continual.stages import SAFETY_EVAL


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def summarize(order: list[str], records: list[dict], safety: bool) -> dict:
    S = len(order)

    def matrix(key):
        return [
            [rec["eval"].get(t, {}).get(key) if i <= s else None for i, t in enumerate(order)]
            for s, rec in enumerate(records)
        ]

    acc, loss = matrix("accuracy"), matrix("loss")
    scored = [all(acc[s][i] is not None for s in range(i, S)) for i in range(S)]
    aa = _mean([acc[-1][i] for i in range(S) if scored[i]])
    forget = (
        _mean(
            [
                max(acc[s][i] for s in range(i, S - 1)) - acc[-1][i]
                for i in range(S - 1)
                if scored[i]
            ]
        )
        if S > 1
        else None
    )
    loss_forget = (
        _mean([loss[-1][i] / min(loss[s][i] for s in range(i, S - 1)) - 1 for i in range(S - 1)])
        if S > 1
        else None
    )
    vul = {
        order[i]: max(loss[s][i] / loss[i][i] for s in range(i + 1, S)) - 1 for i in range(S - 1)
    }
    out = {
        "order": order,
        "accuracy": acc,
        "loss": loss,
        "average_accuracy": aa,
        "forgetting": forget,
        "loss_forgetting": loss_forget,
        "final_loss_ratio": _mean([loss[-1][i] / loss[i][i] for i in range(S)]),
        "vulnerability": vul,
        "replay_share": [_replay_share(rec) for rec in records],
        "cost": {
            "seconds": float(sum(r["seconds"] for r in records)),
            "train_flops": float(sum(r["train_flops"] for r in records)),
            "input_tokens": int(sum(r["input_tokens"] for r in records)),
            "steps": int(sum(r["steps"] for r in records)),
            "params": int(records[-1]["params"]),
        },
    }
    if safety:
        start = (records[0].get("start_eval") or {}).get(SAFETY_EVAL, {})
        per = [rec["eval"][SAFETY_EVAL] for rec in records]
        out["safety"] = {
            "start_accuracy": start.get("accuracy"),
            "start_loss": start.get("loss"),
            "accuracy": [m.get("accuracy") for m in per],
            "loss": [m["loss"] for m in per],
            "final": per[-1].get("accuracy"),
        }
        if start.get("loss"):
            vul[SAFETY_EVAL] = max(m["loss"] for m in per) / start["loss"] - 1
    return out


def _replay_share(rec: dict) -> float | None:
    """Mean share of the examples not drawn from the current task over the stage's decisions."""
    ws = [w for w in rec.get("weights", []) if rec["task"] in w]
    return _mean([1.0 - w[rec["task"]] for w in ws])


def _fmt(x, pct=False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def markdown(result: dict) -> str:
    order = result["order"]
    mixer = result.get("mixer", {})
    shown = {k: v for k, v in mixer.items() if k != "name"}
    lines = [
        f"# Continual run: {' > '.join(order)}",
        "",
        f"mixer: `{mixer.get('name', '?')}` {shown}",
        "",
        "| after stage | " + " | ".join(order) + " | safety |",
        "|---" * (len(order) + 2) + "|",
    ]
    saf = result.get("safety", {})
    for s, row in enumerate(result["accuracy"]):
        cells = [
            f"{_fmt(a, True)} ({_fmt(loss)})" if loss is not None else ""
            for a, loss in zip(row, result["loss"][s])
        ]
        sa = _fmt(saf["accuracy"][s], True) if saf else "-"
        lines.append(f"| {s + 1} {order[s]} | " + " | ".join(cells) + f" | {sa} |")
    lines += [
        "",
        "accuracy in % (loss in parentheses)",
        "",
        f"- average accuracy: {_fmt(result['average_accuracy'], True)}",
        f"- forgetting: {_fmt(result['forgetting'], True)} points "
        f"(loss-based: {_fmt(result['loss_forgetting'])})",
        f"- safety: {_fmt(saf.get('final'), True)} (start {_fmt(saf.get('start_accuracy'), True)})"
        if saf
        else "- safety: -",
        f"- mean replay share per stage: {[_fmt(x) for x in result['replay_share']]}",
        f"- vulnerability (peak loss increase): "
        f"{ {k: round(v, 3) for k, v in result['vulnerability'].items()} }",
        f"- cost: {result['cost']['seconds']:.1f} s, {result['cost']['steps']} steps, "
        f"{result['cost']['train_flops']:.3g} training FLOPs",
        "",
    ]
    return "\n".join(lines)


def write_outputs(out: Path, result: dict) -> None:
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    plot(result, out / "results.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order, S = result["order"], len(result["order"])
    use_acc = result["average_accuracy"] is not None
    grid = np.full((S, S), np.nan)
    for s in range(S):
        for i in range(s + 1):
            v = result["accuracy"][s][i] if use_acc else result["loss"][s][i]
            grid[s, i] = np.nan if v is None else v
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    im = a.imshow(grid, cmap="viridis")
    a.set_xticks(range(S), order, rotation=30)
    a.set_yticks(range(S), [f"after {t}" for t in order])
    a.set_title("accuracy" if use_acc else "loss")
    fig.colorbar(im, ax=a)
    stages = np.arange(1, S + 1)
    if result.get("safety"):
        sa = [np.nan if x is None else x for x in result["safety"]["accuracy"]]
        b.plot(stages, sa, "o-", label="safety accuracy")
    b.plot(
        stages,
        [np.nan if x is None else x for x in result["replay_share"]],
        "s--",
        label="replay share",
    )
    b.set_xlabel("stage")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
