"""A suite's table as files: ``results.md`` (printed too), ``results.csv``, ``cells.csv``,
``results.json`` and ``results.html`` with a quality-vs-cost plot; the rows: :mod:`.table`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = [
    ("method", "method"),
    ("test PPL Δ%", "test_ppl_delta"),
    ("seed range", "seed_range"),
    ("test loss Δ%", "test_loss_delta"),
    ("feasible", "feasible"),
    ("step", "selected_step"),
    ("target Δ% (end)", "target_delta"),
    ("feasible (end)", "feasible_end"),
    ("accuracy", "accuracy"),
    ("forgetting", "forgetting"),
    ("time (s)", "seconds"),
    ("plan (s)", "plan_seconds"),
    ("cost ×", "cost"),
    ("cells", "cells"),
    ("failed", "failed"),
]
CSV_KEYS = [
    "method",
    "test_ppl_delta",
    "ppl_seed_min",
    "ppl_seed_max",
    "test_loss_delta",
    "feasible",
    "selected_step",
    "target_delta",
    "feasible_end",
    "accuracy",
    "forgetting",
    "seconds",
    "plan_seconds",
    "cost",
    "cells",
    "failed",
    "reported_on",
    "config",
]
CELL_KEYS = [
    "key",
    "method",
    "scenario",
    "seed",
    "run",
    "selected_step",
    "feasible",
    "test_ppl_delta",
    "test_loss_delta",
    "reported_on",
    "target_delta",
    "feasible_end",
    "accuracy",
    "forgetting",
    "seconds",
    "plan_seconds",
    "error",
]
PERCENT = ("test_ppl_delta", "test_loss_delta", "target_delta", "feasible", "feasible_end")


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key in PERCENT:
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        if key == "selected_step":
            return f"{v:g}"
        return f"{v:.0f}" if key in ("seconds", "plan_seconds") else f"{v:.3f}"
    return str(v)


def _text(row: dict, key: str) -> str:
    """A row's cell as the Markdown and HTML tables show it."""
    if key == "method" and isinstance(row.get("config"), str):
        return f"{row['method']} ({row['config']})"
    if key == "seed_range":
        lo, hi = row["ppl_seed_min"], row["ppl_seed_max"]
        return "-" if lo is None else f"{100 * lo:.1f}–{100 * hi:.1f}%"
    return _fmt(key, row[key])


def _note(rows: list[dict]) -> str:
    eval_rows = [r["method"] for r in rows if r["reported_on"] in ("eval", "mixed")]
    if not eval_rows:
        return ""
    return "\n\nReported on the selection split (a target without a test split): " + ", ".join(
        eval_rows
    )


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_text(r, k) for _, k in COLUMNS) + " |")
    return "\n".join(lines)


def write_tables(suite, rows: list[dict]) -> None:
    root = Path(suite.output_dir)
    md = markdown_table(rows) + _note(rows)
    errors = [f"- {r['method']}: {e}" for r in rows if "derived" not in r for e in r["errors"]]
    (root / "results.md").write_text(
        md + ("\n\nErrors:\n" + "\n".join(errors) if errors else "") + "\n"
    )
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_KEYS)
        for r in rows:
            config = r.get("config")
            w.writerow(
                [r.get(k) for k in CSV_KEYS[:-1]]
                + [json.dumps(config) if isinstance(config, dict) else config]
            )
    with open(root / "cells.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CELL_KEYS)
        for r in rows:
            if "derived" not in r:
                for c in r["per_cell"]:
                    w.writerow([r["method"] if k == "method" else c.get(k) for k in CELL_KEYS])
    (root / "results.json").write_text(json.dumps(rows, indent=1))
    _write_html(root, rows, _note(rows))
    print(md)


def _write_html(root: Path, rows: list[dict], note: str) -> None:
    import html

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["test_ppl_delta"] is not None]
    if ok:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in ok:
            x, y = r["cost"] or 1.0, 100 * r["test_ppl_delta"]
            err = [[y - 100 * r["ppl_seed_min"]], [100 * r["ppl_seed_max"] - y]]
            ax.errorbar(x, y, yerr=err, fmt="none", ecolor="#999", capsize=3)
            ax.scatter(x, y, s=40 + 160 * (r["feasible"] or 0))
            ax.annotate(r["method"], (x, y), fontsize=8)
        ax.set(
            xlabel="cost (× baseline run)",
            ylabel="constrained test PPL reduction (%)",
            title="quality vs cost (marker size: feasibility; bars: seed range)",
        )
        fig.tight_layout()
        fig.savefig(root / "quality_vs_cost.png", dpi=110)
        plt.close(fig)
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _ in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_text(r, k))}</td>" for _, k in COLUMNS) + "</tr>"
        for r in rows
    )
    img = "<img src='quality_vs_cost.png'>" if ok else ""
    foot = f"<p>{html.escape(note.strip())}</p>" if note else ""
    (root / "results.html").write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mixtune bench</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-"
        "collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}</style></head><body>"
        f"<h1>mixtune bench</h1><table><tr>{head}</tr>{body}</table>{foot}{img}</body></html>"
    )
