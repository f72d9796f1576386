"""A suite's table: per-cell numbers, one row per method (and loss), Markdown/CSV/JSON/HTML.

Rows aggregate over scenarios and seeds:

- **target Δ%**: relative reduction of the mean target-domain loss, base model -> end (median);
- **feasible**: share of cells whose constraint domains all end at or below their reference
  (the configured one, else the base model's value at step 0);
- **accuracy**: mean exact-match accuracy over domains that have answers, at the end;
- **forgetting**: mean loss increase over constraint and monitor domains (0 when none grew);
- **time**, **cost**: median wall time of a cell (a planner method's includes its planning),
  and as a multiple of the ``baseline`` method's median; **plan (s)**: the planning part.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import yaml


def _float(path: Path) -> float | None:
    return float(path.read_text()) if path.is_file() else None


def cell_result(suite, cell) -> dict:
    """The numbers of one finished cell (or its error)."""
    out = Path(suite.output_dir) / "cells" / cell.key
    if (out / "error.txt").is_file() or not (out / "summary.json").is_file():
        err = out / "error.txt"
        return {"error": err.read_text().strip() if err.is_file() else "missing"}
    summary = json.loads((out / "summary.json").read_text())
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r["eval"] for r in recs if "eval" in r]
    before, after = evals[0], evals[-1]
    # references as the cell ran them (reference_slack fills them in cell.yaml)
    ran = out / "cell.yaml"
    ran = yaml.safe_load(ran.read_text())["evals"] if ran.is_file() else cell.scenario.evals
    roles = {e["name"]: (e.get("role", "monitor"), e.get("reference")) for e in ran}
    targets = [d for d, (role, _) in roles.items() if role == "target"]
    t0 = statistics.mean(before[d]["loss"] for d in targets) if targets else None
    t1 = statistics.mean(after[d]["loss"] for d in targets) if targets else None
    feasible = all(after[d]["loss"] <= (ref if ref is not None else before[d]["loss"])
                   for d, (role, ref) in roles.items() if role == "constraint")
    accs = [m["accuracy"] for m in after.values() if "accuracy" in m]
    kept = [d for d, (role, _) in roles.items() if role in ("constraint", "monitor")]
    forgetting = (statistics.mean(max(0.0, after[d]["loss"] - before[d]["loss"]) for d in kept)
                  if kept else None)
    wall = _float(out / "wall.txt")
    return {"target_delta": None if t0 is None else (t0 - t1) / t0, "feasible": feasible,
            "accuracy": statistics.mean(accs) if accs else None, "forgetting": forgetting,
            "seconds": wall if wall is not None else summary["seconds"],
            "plan_seconds": _float(out / "plan_seconds.txt")}


def aggregate(suite, all_cells) -> list[dict]:
    by_label: dict[str, list[dict]] = {}
    for c in all_cells:
        by_label.setdefault(c.label, []).append(cell_result(suite, c))
    base_times = [r["seconds"] for lab, rs in by_label.items() if lab == suite.baseline
                  for r in rs if "error" not in r]
    base_time = statistics.median(base_times) if base_times else None
    rows = []
    for label, results in by_label.items():
        ok = [r for r in results if "error" not in r]
        row = {"method": label, "cells": len(results), "failed": len(results) - len(ok)}
        for key in ("target_delta", "accuracy", "forgetting", "seconds", "plan_seconds"):
            vals = [r[key] for r in ok if r[key] is not None]
            row[key] = statistics.median(vals) if vals else None
        row["feasible"] = (sum(r["feasible"] for r in ok) / len(ok)) if ok else None
        row["cost"] = (row["seconds"] / base_time) if base_time and row["seconds"] else None
        row["errors"] = sorted({r["error"] for r in results if "error" in r})
        rows.append(row)
    return rows


COLUMNS = [("method", "method"), ("target Δ%", "target_delta"), ("feasible", "feasible"),
           ("accuracy", "accuracy"), ("forgetting", "forgetting"), ("time (s)", "seconds"),
           ("plan (s)", "plan_seconds"), ("cost ×", "cost"), ("cells", "cells"),
           ("failed", "failed")]


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key in ("target_delta", "feasible"):
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.0f}" if key in ("seconds", "plan_seconds") else f"{v:.3f}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(k, r[k]) for _, k in COLUMNS) + " |")
    return "\n".join(lines)


def write_tables(suite, rows: list[dict]) -> None:
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
    _write_html(root, rows)
    print(md)


def _write_html(root: Path, rows: list[dict]) -> None:
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
