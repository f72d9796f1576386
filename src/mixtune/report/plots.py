"""Plots of a run's metrics.jsonl (matplotlib, Agg backend).

Each plotting function takes what to draw and an output path, draws one figure and returns the
path (or None when the run has nothing to show for it). :func:`numeric_series` and
:func:`matrices` find what a mixer or a loss logged under its diagnostics section, by shape
only: numbers and mappings of numbers become curves, mappings of mappings of numbers (a slope
matrix, evaluation domain x dataset) heatmaps.

Every plot of one report takes its colours from one :func:`colour_map`, so a domain (or the
dataset of the same name) has the same colour in the weights, the evaluation curves, the
training loss, the predictions and the diagnostics; heatmaps colour their row and column names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Mark = tuple[int, str]  # (step, label): a vertical line, e.g. the run's answer


def colour_map(names: Iterable[str]) -> dict[str, str]:
    """A stable colour per name, in the given order (tab10, then tab20 beyond ten names)."""
    names = list(dict.fromkeys(names))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {n: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, n in enumerate(names)}


def _mark(ax, mark: Mark | None) -> None:
    """The answer's step as a dotted black vertical line, labelled in the legend."""
    if mark is not None:
        ax.axvline(mark[0], ls=":", lw=1.5, color="black", label=mark[1])


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


def weights(
    records: list[dict], path: Path, colours: dict[str, str], mark: Mark | None = None
) -> Path | None:
    """Mixture weights over time (stacked areas: the share of each dataset)."""
    steps, ws = _series(records, "weights")
    if not steps:
        return None
    names = list(ws[0])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    # Weights hold from their step until the next record: draw them as steps.
    ax.stackplot(
        steps,
        [[w[n] for w in ws] for n in names],
        labels=names,
        colors=[colours.get(n, "grey") for n in names],
        step="post",
        alpha=0.85,
    )
    _mark(ax, mark)
    ax.set(xlabel="step", ylabel="share of examples", ylim=(0, 1), title="mixture weights")
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    return _save(fig, path)


def eval_metric(
    records: list[dict],
    metric: str,
    path: Path,
    colours: dict[str, str],
    references: dict[str, float] | None = None,
    mark: Mark | None = None,
) -> Path | None:
    """Per-domain evaluation ``metric`` (loss or accuracy) over time; dashed = the constraint's
    reference (in the domain's colour), dotted black = ``mark`` (the run's answer)."""
    steps, evals = _series(records, "eval")
    domains = sorted({d for e in evals for d, m in e.items() if metric in m})
    if not domains:
        return None
    references = references or {}
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for d in domains:
        pts = [(s, e[d][metric]) for s, e in zip(steps, evals) if d in e and metric in e[d]]
        ax.plot(*zip(*pts), marker="o", ms=3, label=d, color=colours.get(d))
        if d in references:
            ax.axhline(references[d], ls="--", lw=1, color=colours.get(d), label=f"{d} reference")
    _mark(ax, mark)
    values = [abs(e[d][metric]) for e in evals for d in e if metric in e[d]]
    values += [abs(v) for v in references.values()]
    wide = max(values) > 30 * max(min(values), 1e-3)
    if metric == "loss" and wide:  # a reference at 0.02 and a loss at 12 both readable
        ax.set_yscale("symlog", linthresh=0.1)
        if min(values) >= 0:
            ax.set_ylim(bottom=0)
    ax.set(
        xlabel="step",
        ylabel=metric + (" (linear below 0.1, log above)" if metric == "loss" and wide else ""),
        title=f"evaluation {metric} per domain"
        + (" (dashed: constraint reference)" if references else ""),
    )
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    return _save(fig, path)


def train_loss(records: list[dict], path: Path, colours: dict[str, str]) -> Path | None:
    """Training loss per dataset."""
    steps, per = _series(records, "train", "per_dataset")
    if not steps:
        return None
    names = sorted({n for p in per for n in p})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for n in names:
        pts = [(s, p[n]) for s, p in zip(steps, per) if n in p]
        ax.plot(*zip(*pts), lw=1.2, label=n, color=colours.get(n))
    ax.set(xlabel="step", ylabel="token loss", title="training loss per dataset")
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    return _save(fig, path)


def predictions(
    records: list[dict],
    section: str,
    path: Path,
    colours: dict[str, str],
    references: dict[str, float] | None = None,
) -> Path | None:
    """What a mixer predicted against what happened, one panel per domain (each its own
    scale). A mixer that logs ``anchor`` (the values it measured at an update), ``predicted``
    and ``predicted_step`` (where it expects them at the next update) and, at that update,
    ``realised``: solid line and dots = the measured anchors, dashed segment to a hollow
    circle = each prediction, filled square = the value realised there. Values are loss-like
    (an accuracy as -accuracy), as the mixer logs them; dashed grey = a constraint's
    reference in the same units."""
    ups = [r for r in records if isinstance(r.get(section), dict) and "predicted" in r[section]]
    if not ups:
        return None
    realised = {
        r["step"]: r[section]["realised"]
        for r in records
        if isinstance(r.get(section), dict) and "realised" in r[section]
    }
    domains = list(ups[0][section]["predicted"])
    cols = min(3, len(domains))
    nrows = math.ceil(len(domains) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.3 * nrows), squeeze=False)
    for ax, d in zip(axes.flat, domains):
        c = colours.get(d)
        anchors = [
            (u["step"], u[section]["anchor"][d]) for u in ups if d in u[section].get("anchor", {})
        ]
        if anchors:
            ax.plot(*zip(*anchors), marker="o", ms=3, color=c, label="measured")
        for u in ups:
            m = u[section]
            if d not in m.get("anchor", {}) or d not in m["predicted"]:
                continue
            t1 = m.get("predicted_step")
            ax.plot([u["step"], t1], [m["anchor"][d], m["predicted"][d]], ls="--", color=c, lw=1)
            ax.plot([t1], [m["predicted"][d]], marker="o", mfc="none", color=c, ms=5)
            if d in realised.get(t1, {}):
                ax.plot([t1], [realised[t1][d]], marker="s", color=c, ms=4)
        if references and d in references:
            ax.axhline(references[d], ls="--", lw=1, color="grey")
        ax.set_title(d, fontsize=9, color=c)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(domains) :]:
        ax.axis("off")
    fig.suptitle("predicted (hollow, dashed) vs realised (square) at each update", fontsize=9)
    return _save(fig, path)


def is_flat(lines: dict[str, list]) -> bool:
    """True when no line of a series moves: every value of every line equal (or one point)."""
    for pts in lines.values():
        vals = [v for _, v in pts]
        if len(vals) > 1 and max(vals) - min(vals) > 1e-12 * max(1.0, abs(max(vals))):
            return False
    return True


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


def series_plot(
    title: str, lines: dict[str, list], path: Path, colours: dict[str, str] | None = None
) -> Path:
    """One diagnostic series: a line per key (a domain's or dataset's in its colour)."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name, pts in lines.items():
        kw = {"color": colours[name]} if colours and name in colours else {}
        ax.plot(*zip(*pts), marker="o" if len(pts) < 40 else None, ms=3, label=name, **kw)
    ax.set(xlabel="step", title=title)
    if len(lines) > 1:
        ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    return _save(fig, path)


def scalar_panels(title: str, series: dict[str, list], path: Path) -> Path:
    """Several one-line series (``{name: [(step, value), ...]}``) as small panels of one
    figure: a mixer's scalar diagnostics (lambda, horizon, seconds...) without a page each."""
    cols = min(4, len(series))
    nrows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.4 * cols, 1.9 * nrows), squeeze=False)
    for ax, (name, pts) in zip(axes.flat, series.items()):
        ax.plot(*zip(*pts), marker="o" if len(pts) < 40 else None, ms=3, color="0.3")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
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


def matrix_history(records: list[dict], section: str) -> dict[str, list[tuple[int, dict]]]:
    """Every logged value of every matrix under ``section``: ``{key: [(step, matrix), ...]}``
    (a mixer's slope matrix at each of its updates)."""
    out: dict[str, list[tuple[int, dict]]] = {}
    for r in records:
        node = r.get(section)
        if isinstance(node, dict):
            for key, value in node.items():
                if _is_matrix(value):
                    out.setdefault(key, []).append((r["step"], value))
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
    title: str,
    matrix: dict[str, dict],
    path: Path,
    row_tags: dict[str, str] | None = None,
    colours: dict[str, str] | None = None,
) -> Path:
    """``matrix`` (``{row: {column: value}}``) as a heatmap on a diverging scale centred on 0
    (red: positive, blue: negative; for a slope matrix, red = that domain's loss goes up when
    training on that dataset). A missing cell is blank; ``row_tags`` adds a tag to a row's name
    (e.g. T or C for a target or constraint domain); small matrices get their values written
    in the cells; ``colours`` colours the row and column names."""
    fig, ax = plt.subplots(figsize=(2.6 + 0.9 * _ncols(matrix), 1.2 + 0.45 * len(matrix)))
    m = _grid(matrix)
    vmax = float(np.nanmax(np.abs(m))) or 1.0
    im = _draw_matrix(ax, matrix, vmax, row_tags, colours, values=m.size <= 64)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def heatmap_history(
    title: str,
    history: list[tuple[int, dict]],
    path: Path,
    row_tags: dict[str, str] | None = None,
    colours: dict[str, str] | None = None,
) -> Path:
    """One heatmap panel per logged step (e.g. the slope matrix at each update), on one shared
    diverging scale so the panels compare; row names carry ``row_tags`` and ``colours``."""
    n = len(history)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    first = history[0][1]
    w, h = 1.6 + 0.55 * _ncols(first), 0.9 + 0.3 * len(first)
    fig, axes = plt.subplots(nrows, cols, figsize=(w * cols + 1, h * nrows + 0.4), squeeze=False)
    vmax = max(float(np.nanmax(np.abs(_grid(m)))) for _, m in history) or 1.0
    for k, (ax, (step, matrix)) in enumerate(zip(axes.flat, history)):
        im = _draw_matrix(
            ax, matrix, vmax, row_tags, colours, values=False, row_names=k % cols == 0
        )
        ax.set_title(f"step {step}", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.colorbar(im, ax=list(axes.flat), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # tight_layout does not fit the colour bar
    plt.close(fig)
    return path


def _ncols(matrix: dict[str, dict]) -> int:
    return len(dict.fromkeys(c for row in matrix.values() for c in row))


def _grid(matrix: dict[str, dict]) -> np.ndarray:
    cols = list(dict.fromkeys(c for row in matrix.values() for c in row))
    return np.array([[matrix[r].get(c, np.nan) for c in cols] for r in matrix], float)


def _draw_matrix(ax, matrix, vmax, row_tags, colours, values: bool, row_names: bool = True):
    rows = list(matrix)
    cols = list(dict.fromkeys(c for row in matrix.values() for c in row))
    m = _grid(matrix)
    im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    tags = row_tags or {}
    labels = [f"{r} ({tags[r]})" if r in tags else r for r in rows] if row_names else []
    ax.set_yticks(range(len(rows)) if row_names else [], labels, fontsize=8)
    colours = colours or {}
    for names, ticks in (
        (cols, ax.get_xticklabels()),
        (rows if row_names else [], ax.get_yticklabels()),
    ):
        for name, tick in zip(names, ticks):
            tick.set_color(colours.get(name, "black"))
    if values:
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
    return im
