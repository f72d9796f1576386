"""Every sequence of a continual config, with one mixer, and the summary over them.

:func:`run` warms up (if the config asks), runs each order of ``sequences`` (one
sub-directory per sequence when there are several) and writes ``summary.json`` /
``summary.md`` in ``output_dir``: mean average accuracy, forgetting and safety over the
sequences, and the total cost. A method that decides the mixer first (say, after a check on the
target model) calls :func:`run_sequences` and :func:`write_summary` itself, with its own entries
and lines in the summary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mixtune.config import MethodConfig
from mixtune.continual.config import ContinualConfig
from mixtune.continual.driver import run_sequence, warmup


def run(cc: ContinualConfig, echo=print) -> dict:
    """Run every sequence of ``cc`` with ``cc.mixer``; returns (and writes) the summary."""
    out = Path(cc.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = run_sequences(cc, cc.mixer, warmup(cc, out / "warmup"), echo)
    write_summary(out, report, echo=echo)
    return report


def run_sequences(
    cc: ContinualConfig, mixer: MethodConfig, start_model: str | None, echo=print
) -> dict:
    """Every order of ``cc`` with ``mixer`` from ``start_model``; the summary of the results:
    ``mixer``, ``sequences``, the means of the sequence metrics and the total ``cost``."""
    out = Path(cc.output_dir)
    orders = cc.orders()
    results = []
    for k, order in enumerate(orders):
        sdir = out if len(orders) == 1 else out / f"seq-{k + 1}-{'-'.join(order)}"
        res = run_sequence(cc, order, sdir, mixer=mixer, start_model=start_model)
        res.pop("records")
        results.append(res)
        saf = (res.get("safety") or {}).get("final")
        echo(
            f"[continual] {' > '.join(order)}: AA={_pct(res['average_accuracy'])} "
            f"F={_pct(res['forgetting'])} safety={_pct(saf)} ({sdir})"
        )
    return {
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


def write_summary(out: Path, report: dict, notes: Sequence[str] = (), echo=print) -> None:
    """``summary.json`` and ``summary.md`` (``notes``: extra markdown list items)."""
    (out / "summary.json").write_text(json.dumps(report, indent=1))
    (out / "summary.md").write_text(_markdown(report, notes))
    echo(
        f"[continual] mean over {len(report['sequences'])} sequence(s): "
        f"AA={_pct(report['average_accuracy'])} F={_pct(report['forgetting'])} "
        f"safety={_pct(report['safety'])}; summary in {out / 'summary.md'}"
    )


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _markdown(r: dict, notes: Sequence[str]) -> str:
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
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
