"""Plots of a run's metrics.jsonl (matplotlib, Agg backend).

Each plotting function takes what to draw and an output path, draws one figure and returns the
path (or None when the run has nothing to show for it). :func:`numeric_series` and
:func:`matrices` find what a mixer or a loss logged under its diagnostics section, by shape
only: numbers and mappings of numbers become curves, mappings of mappings of numbers (a slope
matrix, evaluation domain x dataset) heatmaps.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

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


def matrices(records: list[dict], section: str) -> dict[str, tuple[int, dict[str, dict]]]:
    """The latest value of every matrix logged under ``section``: a mapping of row names to
    mappings of column names to numbers (every row a mapping, at least one finite number).
    Returns ``{key: (step, {row: {column: value}})}``, in order of first appearance."""
    out: dict[str, tuple[int, dict[str, dict]]] = {}
    for r in records:
        node = r.get(section)
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if _is_matrix(value):
                out[key] = (r["step"], value)
    return out


def _is_matrix(value) -> bool:
    if not isinstance(value, dict) or not value:
        return False
    cells = []
    for row in value.values():
        if not isinstance(row, dict):
            return False
        cells += list(row.values())
    numbers = [v for v in cells if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return len(numbers) == len(cells) and any(math.isfinite(v) for v in numbers)


def heatmap(
    title: str, matrix: dict[str, dict], path: Path, row_tags: dict[str, str] | None = None
) -> Path:
    """``matrix`` (``{row: {column: value}}``) as a heatmap on a diverging scale centred on 0
    (red: positive, blue: negative; for a slope matrix, red = that domain's loss goes up when
    training on that dataset). A missing cell is blank; ``row_tags`` adds a tag to a row's name
    (e.g. T or C for a target or constraint domain); small matrices get their values written
    in the cells."""
    rows = list(matrix)
    cols = list(dict.fromkeys(c for row in matrix.values() for c in row))
    m = np.array([[matrix[r].get(c, np.nan) for c in cols] for r in rows], float)
    vmax = float(np.nanmax(np.abs(m))) or 1.0
    fig, ax = plt.subplots(figsize=(2.6 + 0.9 * len(cols), 1.2 + 0.45 * len(rows)))
    im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    tags = row_tags or {}
    labels = [f"{r} ({tags[r]})" if r in tags else r for r in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    if m.size <= 64:
        for (i, j), v in np.ndenumerate(m):
            if math.isfinite(v):
                dark = abs(v) > 0.6 * vmax  # white on the saturated cells
                ax.text(
                    j,
                    i,
                    f"{v:.2g}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)
