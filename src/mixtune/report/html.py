"""The run report: ``report/index.html`` with the PNGs of :mod:`mixtune.report.plots` embedded.

``mixtune report RUN_DIR`` writes it; the page is self-contained (images inline as base64) so it
can be mailed or attached to an issue. A run with target or constraint domains opens with its
answer (:mod:`mixtune.report.answer`): the model to use, and per domain its role, the base
model's value, the answer's, the last step's, the reference and whether it was kept. Then:
summary, per-domain before/after table (± standard errors), a mixer's predictions ± noise,
mixture weights and evaluation curves (the answer's step marked, constraint references dashed),
training loss, predicted vs realised values, every matrix a mixer or a loss logged (a slope
matrix: evaluation domain x dataset, rows tagged T/C for target/constraint domains) as a heatmap
at its latest step and at each step it was logged, and every numeric series they logged
(rewards, Q, compatibility weights...); series that never move are listed, folded, not drawn.
One colour per domain (and dataset) across every plot (:func:`mixtune.report.plots.colour_map`).
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
from mixtune.report.answer import Answer, domains_of, read_answer

log = logging.getLogger(__name__)

TAGGED = ("target", "constraint")  # evaluation roles tagged in heatmap rows (T, C)
# Mixer keys drawn by plots.predictions, so not again as diagnostics.
PREDICTION_KEYS = ("anchor", "predicted", "predicted_step", "realised", "prediction_error")


def write_report(run_dir: str | Path, extra_sections: list[tuple[str, str]] | None = None) -> Path:
    """Render the report of ``run_dir``; returns the path of index.html."""
    run = Path(run_dir)
    records = read_metrics(run)
    out = run / "report"
    out.mkdir(exist_ok=True)
    summary = _load_json(run / "summary.json")
    domains = domains_of(run)
    answer = read_answer(run, records, summary)
    colours = plots.colour_map(_names(run, records))
    refs = _references(answer, summary, domains)
    mark = _answer_mark(answer)
    # Plotting is the slow part (seconds per figure with matplotlib): say where it is.
    log.info(
        "report: %d records read; plotting weights, evaluation and training curves", len(records)
    )

    figures: list[tuple[str, Path | None]] = [
        ("Mixture weights", plots.weights(records, out / "weights.png", colours, mark)),
        (
            "Evaluation loss",
            plots.eval_metric(records, "loss", out / "eval_loss.png", colours, refs["loss"], mark),
        ),
        (
            "Evaluation accuracy",
            plots.eval_metric(
                records, "accuracy", out / "eval_acc.png", colours, refs["accuracy"], mark
            ),
        ),
        ("Training loss", plots.train_loss(records, out / "train_loss.png", colours)),
    ]
    tags = {d: v["role"][0].upper() for d, v in domains.items() if v["role"] in TAGGED}
    loss_like_refs = {d: -v for d, v in refs["accuracy"].items()} | refs["loss"]
    folded: list[str] = []
    for section in ("mixer", "loss"):
        log.info("report: plotting what the %s logged", section)
        drawn, flat = _section_figures(records, section, out, colours, tags, loss_like_refs)
        figures += drawn
        folded += flat

    parts = [f"<h1>mixtune run report</h1><p><code>{html.escape(str(run.resolve()))}</code></p>"]
    if answer is not None:
        parts.append(answer_table(answer))
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
    if folded:
        parts.append(
            f"<details><summary>{len(folded)} diagnostic series that never moved (not drawn)"
            "</summary><ul>" + "".join(folded) + "</ul></details>"
        )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mixtune report</title>"
        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f3f3f3}img{max-width:100%}"
        ".kept{color:#1a7f37;font-weight:bold}.broken{color:#c62828;font-weight:bold}"
        ".verdict{font-size:1.1em}</style></head><body>" + "\n".join(parts) + "</body></html>"
    )
    (out / "index.html").write_text(page)
    log.info("report: %d figures written to %s", sum(p is not None for _, p in figures), out)
    return out / "index.html"


def _section_figures(
    records: list[dict],
    section: str,
    out: Path,
    colours: dict[str, str],
    tags: dict[str, str],
    refs: dict[str, float],
) -> tuple[list[tuple[str, Path | None]], list[str]]:
    """What a mixer (or a loss) logged under ``section``: its predictions against what
    happened, each matrix at its latest step and at each step it was logged, its series with
    more than one line, its scalars as small panels of one figure; returns the figures and the
    series that never moved (as list items, folded in the page, not drawn)."""
    pred = plots.predictions(records, section, out / f"{section}_predictions.png", colours, refs)
    figures = [(f"{section}: predicted vs realised", pred)]
    for i, (key, logged) in enumerate(plots.matrix_history(records, section).items()):
        step, matrix = logged[-1]
        title = f"{section}: {key} at step {step} (latest)"
        path = out / f"{section}_matrix_{i:02d}.png"
        figures.append((title, plots.heatmap(title, matrix, path, tags, colours)))
        if len(logged) > 1:
            title = f"{section}: {key} at each update"
            path = out / f"{section}_matrix_{i:02d}_history.png"
            figures.append((title, plots.heatmap_history(title, logged, path, tags, colours)))
    folded, scalars, i = [], {}, 0
    for title, lines in plots.numeric_series(records, section).items():
        if pred is not None and title in PREDICTION_KEYS:
            continue
        if plots.is_flat(lines):
            folded.append(_flat(section, title, lines))
        elif list(lines) == [title]:  # one number per record: a small panel
            scalars[title] = lines[title]
        else:
            path = out / f"{section}_{i:02d}.png"
            i += 1
            figures.append((f"{section}: {title}", plots.series_plot(title, lines, path, colours)))
    if scalars:
        title = f"{section}: scalar diagnostics"
        path = out / f"{section}_scalars.png"
        figures.append((title, plots.scalar_panels(title, scalars, path)))
    return figures, folded


def answer_table(answer: Answer) -> str:
    """The run's answer: one sentence, then per domain role, base, answer, last, reference and
    verdict (constraints: kept or broken at the answer; a last value past its reference is
    marked ✗; targets: the change from the base model)."""
    at = "base model" if answer.step is None else f"step {answer.step}"
    head = (
        "<tr><th>domain</th><th>role</th><th>metric</th><th>base (step 0)</th>"
        f"<th>answer ({at})</th><th>last (step {answer.last_step})</th><th>reference</th>"
        "<th>verdict</th></tr>"
    )
    rows = [head]
    for r in answer.rows:
        verdict = ""
        if r.kept is True:
            verdict = "<td class='kept'>✓ kept</td>"
        elif r.kept is False:
            verdict = "<td class='broken'>✗ broken</td>"
        elif r.role == "target" and None not in (r.base, r.answer):
            better = (r.answer < r.base) == (r.metric == "loss")
            verdict = f"<td>{r.answer - r.base:+.4f} ({'better' if better else 'not better'})</td>"
        else:
            verdict = "<td></td>"
        last = _fmt(r.last) + (" <span class='broken'>✗</span>" if r.last_kept is False else "")
        rows.append(
            f"<tr><td style='text-align:left'>{html.escape(r.name)}</td><td>{r.role}</td>"
            f"<td>{r.metric}</td><td>{_fmt(r.base)}</td><td>{_fmt(r.answer)}</td>"
            f"<td>{last}</td><td>{_fmt(r.reference)}</td>{verdict}</tr>"
        )
    path = html.escape(answer.path or "not saved: set train.save_every = train.eval_every")
    return (
        "<h2>The answer</h2>"
        f"<p class='verdict'>{html.escape(answer.headline())}</p>"
        f"<p>Model to use: <code>{path}</code> (rule: {html.escape(answer.rule)}, "
        f"source: {html.escape(answer.source)}). A constraint is kept when the answer's value "
        "is at or under its reference (accuracy: at or over).</p>"
        "<table class='answer'>" + "".join(rows) + "</table>"
    )


def _names(run: Path, records: list[dict]) -> list[str]:
    """Datasets then evaluation domains, in config order: the order of the colour map."""
    path = run / "config.yaml"
    raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    names = [
        d["name"]
        for d in (raw or {}).get("datasets") or []
        if isinstance(d, dict) and isinstance(d.get("name"), str)
    ]
    names += list(domains_of(run))
    for r in records:  # anything the config does not name (a report of a bare metrics file)
        names += list(r.get("weights") or {}) + list(r.get("eval") or {})
    return list(dict.fromkeys(names))


def _references(answer: Answer | None, summary: dict | None, domains: dict) -> dict[str, dict]:
    """Constraint references by metric, ``{"loss": {domain: v}, "accuracy": {...}}``: from the
    answer, else ``summary.json``'s ``best_feasible.references``."""
    if answer is not None:
        refs = {r.name: r.reference for r in answer.rows if r.reference is not None}
    else:
        best = (summary or {}).get("best_feasible") or {}
        refs = best.get("references") or {}
    out: dict[str, dict] = {"loss": {}, "accuracy": {}}
    for name, v in refs.items():
        metric = domains.get(name, {}).get("metric", "loss")
        out["accuracy" if metric == "accuracy" else "loss"][name] = float(v)
    return out


def _answer_mark(answer: Answer | None) -> plots.Mark | None:
    if answer is None:
        return None
    if answer.step is None:
        return (0, "answer: keep the base model")
    return (answer.step, f"answer: step {answer.step}")


def _flat(section: str, title: str, lines: dict[str, list]) -> str:
    values = ", ".join(f"{k} = {pts[-1][1]:.4g}" for k, pts in lines.items())
    return f"<li>{html.escape(section)}: {html.escape(title)}: {html.escape(values)}</li>"


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


def _load_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None
