"""Plots of a run's metrics.jsonl (matplotlib, Agg backend).

Each function takes the list of metrics records and an output path, draws one figure and returns
the path (or None when the run has nothing to show for it).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(records: list[dict], *keys: str) -> tuple[list[int], list]:
    """(steps, values) of the records holding the nested key path ``keys``."""
    steps, values = [], []
    for r in records:
        node = r
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
            if node is None:
                break
        if node is not None:
            steps.append(r["step"])
            values.append(node)
    return steps, values


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def weights(records: list[dict], path: Path) -> Path | None:
    """Mixture weights over time (stacked areas: the share of each dataset)."""
    steps, ws = _series(records, "weights")
    if not steps:
        return None
    names = list(ws[0])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    # Weights hold from their step until the next record: draw them as steps.
    ax.stackplot(steps, [[w[n] for w in ws] for n in names], labels=names, step="post", alpha=0.85)
    ax.set(xlabel="step", ylabel="share of examples", ylim=(0, 1), title="mixture weights")
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    return _save(fig, path)


def eval_metric(
    records: list[dict], metric: str, path: Path, references: dict[str, float] | None = None
) -> Path | None:
    """Per-domain evaluation ``metric`` (loss or accuracy) over time; dashed = reference."""
    steps, evals = _series(records, "eval")
    domains = sorted({d for e in evals for d, m in e.items() if metric in m})
    if not domains:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for d in domains:
        pts = [(s, e[d][metric]) for s, e in zip(steps, evals) if d in e and metric in e[d]]
        (line,) = ax.plot(*zip(*pts), marker="o", ms=3, label=d)
        if references and d in references:
            ax.axhline(references[d], ls="--", lw=1, color=line.get_color())
    ax.set(
        xlabel="step",
        ylabel=metric,
        title=f"evaluation {metric} per domain"
        + (" (dashed: constraint reference)" if references else ""),
    )
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    return _save(fig, path)


def train_loss(records: list[dict], path: Path) -> Path | None:
    """Training loss per dataset."""
    steps, per = _series(records, "train", "per_dataset")
    if not steps:
        return None
    names = sorted({n for p in per for n in p})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for n in names:
        pts = [(s, p[n]) for s, p in zip(steps, per) if n in p]
        ax.plot(*zip(*pts), lw=1.2, label=n)
    ax.set(xlabel="step", ylabel="token loss", title="training loss per dataset")
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    return _save(fig, path)


def numeric_series(records: list[dict], section: str) -> dict[str, dict[str, list]]:
    """Every plottable series under ``section`` (e.g. "mixer", "loss"), flattened.

    A number gives one series; a dict of numbers (e.g. Q per dataset) gives one line per key.
    Returns ``{title: {line: [(step, value), ...]}}``.
    """
    out: dict[str, dict[str, list]] = {}
    for r in records:
        node = r.get(section)
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, (int, float)):
                out.setdefault(key, {}).setdefault(key, []).append((r["step"], value))
            elif isinstance(value, dict):
                for sub, v in value.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        out.setdefault(key, {}).setdefault(str(sub), []).append((r["step"], v))
    return {k: v for k, v in out.items() if any(len(pts) > 0 for pts in v.values())}


def series_plot(title: str, lines: dict[str, list], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name, pts in lines.items():
        ax.plot(*zip(*pts), marker="o" if len(pts) < 40 else None, ms=3, label=name)
    ax.set(xlabel="step", title=title)
    if len(lines) > 1:
        ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    return _save(fig, path)
