"""``mixtune bench SUITE.yaml``: methods side by side on the same scenarios, one table.

A suite names one or more scenarios (training datasets, evaluation domains with roles, a step
budget), the methods to compare (a mixer config each, optionally a loss as a second axis) and the
seeds. Every (scenario, method, loss, seed) cell is an ordinary ``mixtune train`` run in its own
process under ``<output_dir>/cells/``; a cell with ``summary.json`` is finished and never rerun, so
an interrupted suite resumes. A cell that fails records its error (``error.txt``) and the rest
finish. Cells run in parallel processes (``parallel``), each with ``threads`` torch threads.

The table (Markdown, CSV, HTML with plots), one row per method (and loss), aggregated over
scenarios and seeds:

- **target Δ%**: relative reduction of the mean target-domain loss, base model -> end (median);
- **feasible**: share of cells whose constraint domains all end at or below their reference
  (the base model's value at step 0, or the configured one);
- **accuracy**: mean exact-match accuracy over domains that have answers, at the end;
- **forgetting**: mean loss increase over constraint and monitor domains (0 when none grew);
- **time**, **cost**: median wall time, and as a multiple of the ``baseline`` method's median.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mixtune import schema
from mixtune.errors import ConfigError

SUITES_DIR = Path(__file__).parent / "suites"


@dataclass(frozen=True)
class Method:
    name: str
    """Label in the table."""
    mixer: dict = field(default_factory=lambda: {"name": "proportional"})
    loss: dict = field(default_factory=lambda: {"name": "sft"})


@dataclass(frozen=True)
class Scenario:
    name: str
    datasets: tuple[dict, ...]
    evals: tuple[dict, ...]
    overrides: tuple[str, ...] = ()
    """Extra ``key=value`` overrides for this scenario's cells."""


@dataclass(frozen=True)
class Suite:
    output_dir: str = "runs/bench"
    base: dict = field(default_factory=dict)
    """Run-config keys shared by every cell (model, train, max_steps, ...)."""
    scenarios: tuple[Scenario, ...] = ()
    methods: tuple[Method, ...] = ()
    losses: tuple[str, ...] = ()
    """Optional second axis: every method is also run with each of these losses."""
    seeds: tuple[int, ...] = (0,)
    baseline: str = "proportional"
    """Method whose median wall time is cost 1.0."""
    parallel: int = 1
    threads: int = 2

    def __post_init__(self):
        if not self.scenarios or not self.methods:
            raise ConfigError("suite: needs at least one scenario and one method")
        if self.parallel < 1 or self.threads < 1:
            raise ConfigError("suite: parallel and threads must be >= 1")


def load_suite(path_or_name: str, overrides: list[str] | tuple[str, ...] = ()) -> Suite:
    """A suite from a YAML path or a built-in name (``quick``, ``standard``)."""
    path = Path(path_or_name)
    if not path.is_file() and (SUITES_DIR / f"{path_or_name}.yaml").is_file():
        path = SUITES_DIR / f"{path_or_name}.yaml"
    raw = schema.read_yaml(path)
    for item in overrides:
        schema.apply_override(raw, item)
    return schema.build(Suite, raw, "suite")


@dataclass
class Cell:
    scenario: Scenario
    method: Method
    loss: str | None
    seed: int

    @property
    def key(self) -> str:
        loss = f"-{self.loss}" if self.loss else ""
        return f"{self.scenario.name}--{self.method.name}{loss}--s{self.seed}"

    @property
    def label(self) -> str:
        return self.method.name + (f" + {self.loss}" if self.loss else "")


def cells(suite: Suite) -> list[Cell]:
    losses = suite.losses or (None,)
    return [Cell(sc, m, loss, seed) for sc in suite.scenarios for m in suite.methods
            for loss in losses for seed in suite.seeds]


def run_suite(suite: Suite, progress: bool = True) -> dict:
    """Run every unfinished cell, then write the tables; returns the aggregated rows."""
    root = Path(suite.output_dir)
    (root / "cells").mkdir(parents=True, exist_ok=True)
    todo = [c for c in cells(suite) if not (root / "cells" / c.key / "summary.json").is_file()]
    total = len(cells(suite))
    print(f"suite: {total} cells, {total - len(todo)} already done, running {len(todo)} "
          f"({suite.parallel} at a time, {suite.threads} threads each)", flush=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not progress)

    def one(cell: Cell) -> None:
        _run_cell(suite, cell, root / "cells" / cell.key)
        bar.update(1)

    with ThreadPoolExecutor(max_workers=suite.parallel) as pool:
        list(pool.map(one, todo))
    bar.close()
    rows = aggregate(suite)
    write_tables(suite, rows)
    return rows


def _run_cell(suite: Suite, cell: Cell, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads(json.dumps(suite.base))  # deep copy
    raw.update(output_dir=str(out), seed=cell.seed, progress=False,
               datasets=list(cell.scenario.datasets), evals=list(cell.scenario.evals),
               mixer=cell.method.mixer, loss={"name": cell.loss} if cell.loss else cell.method.loss)
    (out / "cell.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(suite.threads),
           "MKL_NUM_THREADS": str(suite.threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mixtune", "train", str(out / "cell.yaml"),
         *cell.scenario.overrides],
        env=env, capture_output=True, text=True,
    )
    (out / "stdout.txt").write_text(proc.stdout)
    (out / "stderr.txt").write_text(proc.stderr)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        (out / "error.txt").write_text(f"exit {proc.returncode}: {last}\n")
    else:
        (out / "error.txt").unlink(missing_ok=True)
        (out / "wall.txt").write_text(f"{time.perf_counter() - t0:.3f}\n")


def cell_result(suite: Suite, cell: Cell) -> dict:
    """The numbers of one finished cell (or its error)."""
    out = Path(suite.output_dir) / "cells" / cell.key
    if (out / "error.txt").is_file() or not (out / "summary.json").is_file():
        err = out / "error.txt"
        return {"error": err.read_text().strip() if err.is_file() else "missing"}
    summary = json.loads((out / "summary.json").read_text())
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r["eval"] for r in recs if "eval" in r]
    before, after = evals[0], evals[-1]
    roles = {e["name"]: (e.get("role", "monitor"), e.get("reference"))
             for e in cell.scenario.evals}
    targets = [d for d, (role, _) in roles.items() if role == "target"]
    t0 = statistics.mean(before[d]["loss"] for d in targets) if targets else None
    t1 = statistics.mean(after[d]["loss"] for d in targets) if targets else None
    feasible = all(after[d]["loss"] <= (ref if ref is not None else before[d]["loss"])
                   for d, (role, ref) in roles.items() if role == "constraint")
    accs = [m["accuracy"] for m in after.values() if "accuracy" in m]
    kept = [d for d, (role, _) in roles.items() if role in ("constraint", "monitor")]
    forgetting = (statistics.mean(max(0.0, after[d]["loss"] - before[d]["loss"]) for d in kept)
                  if kept else None)
    wall = float((out / "wall.txt").read_text()) if (out / "wall.txt").is_file() \
        else summary["seconds"]
    return {"target_delta": None if t0 is None else (t0 - t1) / t0, "feasible": feasible,
            "accuracy": statistics.mean(accs) if accs else None, "forgetting": forgetting,
            "seconds": wall}


def aggregate(suite: Suite) -> list[dict]:
    by_label: dict[str, list[dict]] = {}
    for c in cells(suite):
        by_label.setdefault(c.label, []).append(cell_result(suite, c))
    base_times = [r["seconds"] for lab, rs in by_label.items() if lab == suite.baseline
                  for r in rs if "error" not in r]
    base_time = statistics.median(base_times) if base_times else None
    rows = []
    for label, results in by_label.items():
        ok = [r for r in results if "error" not in r]
        row = {"method": label, "cells": len(results), "failed": len(results) - len(ok)}
        for key in ("target_delta", "accuracy", "forgetting", "seconds"):
            vals = [r[key] for r in ok if r[key] is not None]
            row[key] = statistics.median(vals) if vals else None
        row["feasible"] = (sum(r["feasible"] for r in ok) / len(ok)) if ok else None
        row["cost"] = (row["seconds"] / base_time) if base_time and row["seconds"] else None
        row["errors"] = sorted({r["error"] for r in results if "error" in r})
        rows.append(row)
    return rows


COLUMNS = [("method", "method"), ("target Δ%", "target_delta"), ("feasible", "feasible"),
           ("accuracy", "accuracy"), ("forgetting", "forgetting"), ("time (s)", "seconds"),
           ("cost ×", "cost"), ("cells", "cells"), ("failed", "failed")]


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key in ("target_delta", "feasible"):
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.3f}" if key != "seconds" else f"{v:.0f}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(k, r[k]) for _, k in COLUMNS) + " |")
    return "\n".join(lines)


def write_tables(suite: Suite, rows: list[dict]) -> None:
    root = Path(suite.output_dir)
    md = markdown_table(rows)
    errors = [f"- {r['method']}: {e}" for r in rows for e in r["errors"]]
    (root / "results.md").write_text(md + ("\n\nErrors:\n" + "\n".join(errors) if errors else "")
                                     + "\n")
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([k for _, k in COLUMNS])
        for r in rows:
            w.writerow([r[k] for _, k in COLUMNS])
    (root / "results.json").write_text(json.dumps(rows, indent=1))
    _write_html(root, rows, md)
    print(md)


def _write_html(root: Path, rows: list[dict], md: str) -> None:
    import html

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["target_delta"] is not None]
    if ok:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in ok:
            ax.scatter(r["cost"] or 1.0, 100 * r["target_delta"], s=40 + 160 * (r["feasible"] or 0))
            ax.annotate(r["method"], (r["cost"] or 1.0, 100 * r["target_delta"]), fontsize=8)
        ax.set(xlabel="cost (× baseline run)", ylabel="target loss reduction (%)",
               title="quality vs cost (marker size: feasibility)")
        fig.tight_layout()
        fig.savefig(root / "quality_vs_cost.png", dpi=110)
        plt.close(fig)
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _ in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(k, r[k]))}</td>" for _, k in COLUMNS)
                   + "</tr>" for r in rows)
    img = "<img src='quality_vs_cost.png'>" if ok else ""
    (root / "results.html").write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mixtune bench</title>"
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-"
        "collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}</style></head><body>"
        f"<h1>mixtune bench</h1><table><tr>{head}</tr>{body}</table>{img}</body></html>")
