"""The run report: ``report/index.html`` with the PNGs of :mod:`mixtune.report.plots` embedded.

``mixtune report RUN_DIR`` writes it; the page is self-contained (images inline as base64) so it
can be mailed or attached to an issue. Sections: summary, per-domain before/after table,
mixture weights, evaluation curves, training loss, and every numeric series a mixer or a loss
logged (rewards, Q, slopes, compatibility weights...).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from mixtune.engine.rundir import read_metrics
from mixtune.report import plots


def write_report(run_dir: str | Path, extra_sections: list[tuple[str, str]] | None = None) -> Path:
    """Render the report of ``run_dir``; returns the path of index.html."""
    run = Path(run_dir)
    records = read_metrics(run)
    out = run / "report"
    out.mkdir(exist_ok=True)
    summary = _load_json(run / "summary.json")
    references = (summary or {}).get("references") or {}

    figures: list[tuple[str, Path | None]] = [
        ("Mixture weights", plots.weights(records, out / "weights.png")),
        ("Evaluation loss", plots.eval_metric(records, "loss", out / "eval_loss.png",
                                              {k: v for k, v in references.items()
                                               if not k.endswith(":accuracy")})),
        ("Evaluation accuracy", plots.eval_metric(records, "accuracy", out / "eval_acc.png")),
        ("Training loss", plots.train_loss(records, out / "train_loss.png")),
    ]
    for section in ("mixer", "loss"):
        for i, (title, lines) in enumerate(plots.numeric_series(records, section).items()):
            path = out / f"{section}_{i:02d}.png"
            figures.append((f"{section}: {title}", plots.series_plot(title, lines, path)))

    parts = [f"<h1>mixtune run report</h1><p><code>{html.escape(str(run.resolve()))}</code></p>"]
    parts.append(_table(records, summary))
    for title, body in extra_sections or []:
        parts.append(f"<h2>{html.escape(title)}</h2>{body}")
    for title, path in figures:
        if path is None:
            continue
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{data}'>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>mixtune report</title>"
            "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
            "text-align:right}th{background:#f3f3f3}img{max-width:100%}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    (out / "index.html").write_text(page)
    return out / "index.html"


def _table(records: list[dict], summary: dict | None) -> str:
    evals = [r for r in records if "eval" in r]
    if not evals:
        return "<p>No evaluation recorded.</p>"
    first, last = evals[0], evals[-1]
    rows = ["<tr><th>domain</th><th>loss @ step %d</th><th>loss @ step %d</th>"
            "<th>accuracy @ %d</th><th>accuracy @ %d</th></tr>"
            % (first["step"], last["step"], first["step"], last["step"])]
    for d in last["eval"]:
        a, b = first["eval"].get(d, {}), last["eval"][d]
        rows.append("<tr><td style='text-align:left'>%s</td><td>%s</td><td>%s</td><td>%s</td>"
                    "<td>%s</td></tr>" % (html.escape(d), _fmt(a.get("loss")),
                                          _fmt(b.get("loss")), _fmt(a.get("accuracy")),
                                          _fmt(b.get("accuracy"))))
    info = ""
    if summary:
        info = (f"<p>{summary.get('steps')} steps, {summary.get('tokens')} supervised tokens, "
                f"{summary.get('seconds')} s.</p>")
    return info + "<h2>Per-domain results</h2><table>" + "".join(rows) + "</table>"


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _load_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None
