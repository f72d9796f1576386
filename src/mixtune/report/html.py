"""The run report: ``report/index.html`` with the PNGs of :mod:`mixtune.report.plots` embedded.

``mixtune report RUN_DIR`` writes it; the page is self-contained (images inline as base64) so it
can be mailed or attached to an issue. Sections: summary, per-domain before/after table,
mixture weights, evaluation curves, training loss, the latest value of every matrix a mixer or a
loss logged (a slope matrix: evaluation domain x dataset, rows tagged T/C for target/constraint
domains) as a heatmap, and every numeric series they logged (rewards, Q, compatibility
weights...).
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path

import yaml

from mixtune.engine.rundir import read_metrics
from mixtune.report import plots

log = logging.getLogger(__name__)

TAGGED = ("target", "constraint")  # evaluation roles tagged in heatmap rows (T, C)


def write_report(run_dir: str | Path, extra_sections: list[tuple[str, str]] | None = None) -> Path:
    """Render the report of ``run_dir``; returns the path of index.html."""
    run = Path(run_dir)
    records = read_metrics(run)
    out = run / "report"
    out.mkdir(exist_ok=True)
    summary = _load_json(run / "summary.json")
    references = (summary or {}).get("references") or {}
    # Plotting is the slow part (seconds per figure with matplotlib): say where it is.
    log.info(
        "report: %d records read; plotting weights, evaluation and training curves", len(records)
    )

    figures: list[tuple[str, Path | None]] = [
        ("Mixture weights", plots.weights(records, out / "weights.png")),
        (
            "Evaluation loss",
            plots.eval_metric(
                records,
                "loss",
                out / "eval_loss.png",
                {k: v for k, v in references.items() if not k.endswith(":accuracy")},
            ),
        ),
        ("Evaluation accuracy", plots.eval_metric(records, "accuracy", out / "eval_acc.png")),
        ("Training loss", plots.train_loss(records, out / "train_loss.png")),
    ]
    tags = {d: role[0].upper() for d, role in _roles(run).items() if role in TAGGED}
    for section in ("mixer", "loss"):
        log.info("report: plotting what the %s logged", section)
        for i, (key, (step, matrix)) in enumerate(plots.matrices(records, section).items()):
            title = f"{section}: {key} at step {step} (latest)"
            path = out / f"{section}_matrix_{i:02d}.png"
            figures.append((title, plots.heatmap(title, matrix, path, tags)))
        for i, (title, lines) in enumerate(plots.numeric_series(records, section).items()):
            path = out / f"{section}_{i:02d}.png"
            figures.append((f"{section}: {title}", plots.series_plot(title, lines, path)))

    parts = [f"<h1>mixtune run report</h1><p><code>{html.escape(str(run.resolve()))}</code></p>"]
    parts.append(_table(records, summary))
    parts.append(_noise(records))
    for title, body in extra_sections or []:
        parts.append(f"<h2>{html.escape(title)}</h2>{body}")
    for title, path in figures:
        if path is None:
            continue
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(
            f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
            f"src='data:image/png;base64,{data}'>"
        )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mixtune report</title>"
        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f3f3f3}img{max-width:100%}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>"
    )
    (out / "index.html").write_text(page)
    log.info("report: %d figures written to %s", sum(p is not None for _, p in figures), out)
    return out / "index.html"


def _table(records: list[dict], summary: dict | None) -> str:
    evals = [r for r in records if "eval" in r]
    if not evals:
        return "<p>No evaluation recorded.</p>"
    first, last = evals[0], evals[-1]
    rows = [
        "<tr><th>domain</th><th>loss @ step %d</th><th>loss @ step %d</th>"
        "<th>change ± paired se</th><th>accuracy @ %d</th><th>accuracy @ %d</th></tr>"
        % (first["step"], last["step"], first["step"], last["step"])
    ]
    for d in last["eval"]:
        a, b = first["eval"].get(d, {}), last["eval"][d]
        rows.append(
            "<tr><td style='text-align:left'>%s</td><td>%s</td><td>%s</td><td>%s</td>"
            "<td>%s</td><td>%s</td></tr>"
            % (
                html.escape(d),
                _pm(a.get("loss"), a.get("loss_se")),
                _pm(b.get("loss"), b.get("loss_se")),
                _change(a, b),
                _fmt(a.get("accuracy")),
                _fmt(b.get("accuracy")),
            )
        )
    info = ""
    if summary:
        info = (
            f"<p>{summary.get('steps')} steps, {summary.get('tokens')} supervised tokens, "
            f"{summary.get('seconds')} s.</p>"
        )
    return info + "<h2>Per-domain results</h2><table>" + "".join(rows) + "</table>"


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _pm(x, se) -> str:
    """``x ± se`` (the standard error over the evaluated examples, when logged)."""
    if x is None:
        return "-"
    return f"{x:.4f}" + (f" ± {se:.4f}" if isinstance(se, float) and se == se else "")


def _change(a: dict, b: dict) -> str:
    """The change since the first evaluation with its paired standard error; bold when it is
    beyond two standard errors (the domain really moved, not which examples were drawn)."""
    if a.get("loss") is None or b.get("loss") is None:
        return "-"
    delta, se = b["loss"] - a["loss"], b.get("change_se")
    if not isinstance(se, float) or se != se:
        return f"{delta:+.4f}"
    text = f"{delta:+.4f} ± {se:.4f}"
    return f"<b>{text}</b>" if abs(delta) > 2 * se else text


def _noise(records: list[dict]) -> str:
    """A mixer's constraint predictions at each update with their noise, when it logs slope
    standard errors (``S_se``) beside its predictions: the predicted change
    H·S_i·w ± H·sqrt(Σ_j w_j² SE_ij²) (from the probes' paired standard errors), and what the
    next update measured; plus the noise warnings, in plain words."""
    ups = [r for r in records if isinstance(r.get("mixer"), dict) and "S_se" in r["mixer"]]
    if not ups:
        return ""
    roles = next((u["mixer"]["roles"] for u in ups if "roles" in u["mixer"]), {})
    cons = [d for d, role in roles.items() if role == "constraint"]
    realised = {u["step"]: u["mixer"].get("realised", {}) for u in ups}
    head = "".join(f"<th>{html.escape(d)}</th>" for d in cons)
    rows = [f"<tr><th>step</th><th>horizon</th>{head}</tr>"]
    for u in ups:
        m, w = u["mixer"], u.get("weights", {})
        cells = []
        for d in cons:
            pred = m["predicted"][d] - m["anchor"][d]
            var = sum(
                (w.get(j, 0.0) * se) ** 2
                for j, se in m["S_se"][d].items()
                if isinstance(se, float) and se == se
            )
            seen = realised.get(m.get("predicted_step"), {}).get(d)
            real = "" if seen is None else f" (then {seen - m['anchor'][d]:+.4f})"
            cells.append(f"<td>{pred:+.4f} ± {m['horizon'] * var**0.5:.4f}{real}</td>")
        rows.append(f"<tr><td>{u['step']}</td><td>{m['horizon']}</td>{''.join(cells)}</tr>")
    notes = [n for u in ups for n in u["mixer"].get("noise_warnings", [])]
    warn = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (
        "<h2>Predicted constraint changes ± noise</h2><p>At each update: the "
        "predicted change of each constraint over the next interval under the chosen "
        "mixture ± its standard error from the probes (paired over the same examples), and "
        "(then) the change the next update measured.</p><table>"
        + "".join(rows)
        + "</table>"
        + (f"<p>Noise warnings:</p><ul>{warn}</ul>" if warn else "")
    )


def _roles(run: Path) -> dict[str, str]:
    """Each evaluation domain's role, from the run's saved config (empty when there is none)."""
    path = run / "config.yaml"
    raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    evals = raw.get("evals") if isinstance(raw, dict) else None
    return {
        e["name"]: e.get("role", "monitor")
        for e in evals or []
        if isinstance(e, dict) and isinstance(e.get("name"), str)
    }


def _load_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None
