import json
from html.parser import HTMLParser
from pathlib import Path

from mixtune import cli, config
from mixtune.engine.loop import Trainer
from mixtune.engine.rundir import RunDir, read_metrics
from mixtune.report import plots, write_report


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        if tag == "table":
            self.tables += 1


def test_report_renders_with_plots(make_config, tmp_path, capsys):
    Trainer(config.load(data=make_config(max_steps=4))).run()
    run = tmp_path / "run"
    # A mixer's diagnostics (numbers and dicts of numbers) become plots of their own.
    rd = RunDir(run)
    rd.append_metrics({"step": 5, "mixer": {"Q": {"add": 0.1, "rev": 0.4}, "seconds": 0.2}})
    rd.append_metrics({"step": 6, "mixer": {"Q": {"add": 0.2, "rev": 0.3}, "seconds": 0.3}})
    assert cli.main(["report", str(run)]) == 0
    index = run / "report/index.html"
    assert capsys.readouterr().out.strip() == str(index)
    parser = _Collect()
    parser.feed(index.read_text())
    assert parser.tables == 1 and len(parser.imgs) >= 6
    assert all(src.startswith("data:image/png;base64,") and len(src) > 1000 for src in parser.imgs)
    for name in ("weights.png", "eval_loss.png", "train_loss.png", "mixer_00.png"):
        assert (run / "report" / name).stat().st_size > 1000


def test_numeric_series_flattens_dicts():
    recs = [
        {"step": 1, "mixer": {"Q": {"a": 1.0, "b": 2.0}, "flag": True, "text": "x"}},
        {"step": 2, "mixer": {"Q": {"a": 1.5, "b": 2.5}}},
    ]
    got = plots.numeric_series(recs, "mixer")
    assert got["Q"] == {"a": [(1, 1.0), (2, 1.5)], "b": [(1, 2.0), (2, 2.5)]}
    assert got["flag"] == {"flag": [(1, 1.0)]} and "text" not in got


def test_matrices_are_found_by_shape_and_drawn_as_heatmaps(tmp_path):
    recs = [
        {"step": 0, "mixer": {"S": {"a": {"x": 1.0, "y": -2.0}, "b": {"x": 0.5, "y": 0.0}}}},
        {"step": 4, "mixer": {"S": {"a": {"x": 3.0, "y": -1.0}, "b": {"x": 0.1}}, "Q": {"x": 1}}},
        {"step": 5, "mixer": {"flags": {"a": {"x": True}}, "blank": {"a": {"x": float("nan")}}}},
    ]
    got = plots.matrices(recs, "mixer")
    assert got == {"S": (4, recs[1]["mixer"]["S"])}  # the latest; rows may lack a column
    png = plots.heatmap("S", got["S"][1], tmp_path / "S.png", {"a": "T"})
    assert png.stat().st_size > 1000
    assert plots.matrices(recs, "loss") == {}


def test_report_draws_the_latest_logged_matrix(make_config, tmp_path):
    Trainer(config.load(data=make_config(max_steps=4))).run()
    run = tmp_path / "run"
    for step, v in ((5, 1.0), (6, -2.0)):
        RunDir(run).append_metrics({"step": step, "mixer": {"S": {"add": {"add": v, "rev": 0.5}}}})
    page = write_report(run).read_text()
    assert "<h2>mixer: S at step 6 (latest)</h2><img" in page
    assert "<h2>mixer: S at step 5" not in page
    assert (run / "report/mixer_matrix_00.png").stat().st_size > 1000


def test_report_of_non_run_dir_is_bad_input(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert write_report  # imported API


def test_report_renders_in_a_headless_browser(make_config, tmp_path):
    """The page renders offline in a real browser: the screenshot is a non-blank image."""
    import numpy as np
    import pytest
    from PIL import Image

    from mixtune.report.browser import find_browser, screenshot

    if find_browser() is None:
        pytest.skip("no Chromium-family browser (Debian: apt-get install chromium)")
    Trainer(config.load(data=make_config(max_steps=4))).run()
    index = write_report(tmp_path / "run")
    png = screenshot(index, tmp_path / "shot.png", width=900, height=900)
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.shape == (900, 900)
    # Plots and a table: many dark pixels on a light page, not an empty or error page.
    assert (pixels < 128).mean() > 0.01 and pixels.std() > 20


# --- a constrained run's report: the answer first, references, one colour per domain ---------


class _Tables(HTMLParser):
    """The cells of every <table class='answer'>: a list of rows of (text, class) pairs."""

    def __init__(self):
        super().__init__()
        self.rows, self._in, self._cell = [], False, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._in = a.get("class") == "answer"
        elif self._in and tag == "tr":
            self.rows.append([])
        elif self._in and tag in ("td", "th"):
            self._cell = [tag, "", a.get("class")]

    def handle_endtag(self, tag):
        if tag == "table":
            self._in = False
        elif self._in and tag in ("td", "th") and self._cell:
            self.rows[-1].append((self._cell[1].strip(), self._cell[2]))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data


def _constrained(make_config, reference=None):
    """A run whose datasets are listed rev, add (not sorted: the colour map must follow the
    config, not each plot's order), with add a target and rev a constraint."""
    raw = make_config(max_steps=8)
    raw["datasets"] = raw["datasets"][::-1]
    raw["evals"][0]["role"] = "target"
    raw["evals"][1].update(role="constraint", reference=reference)
    raw["train"]["save_every"] = 4
    Trainer(config.load(data=raw)).run()
    return Path(raw["output_dir"])


def _answer_rows(page: str) -> dict[str, dict]:
    p = _Tables()
    p.feed(page)
    head = [t for t, _ in p.rows[0]]
    return {r[0][0]: {h: c for h, c in zip(head, r)} for r in p.rows[1:]}


def test_report_of_a_constrained_run_answers_first(make_config):
    run = _constrained(make_config)
    summary = json.loads((run / "summary.json").read_text())
    best = summary["best_feasible"]
    page = write_report(run).read_text()
    assert page.index("<h2>The answer</h2>") < page.index("<h2>Per-domain results</h2>")
    rows = _answer_rows(page)
    evals = {r["step"]: r["eval"] for r in read_metrics(run) if "eval" in r}
    step = 0 if best["keep_base_model"] else best["step"]
    ref = best["references"]["rev"]
    add, rev = rows["add"], rows["rev"]
    assert add["role"][0] == "target" and rev["role"][0] == "constraint"
    assert rev["base (step 0)"][0] == f"{evals[0]['rev']['loss']:.4f}"
    answer_col = next(h for h in rev if h.startswith("answer ("))
    assert rev[answer_col][0] == f"{evals[step]['rev']['loss']:.4f}"
    assert rev["last (step 8)"][0].startswith(f"{evals[8]['rev']['loss']:.4f}")
    assert rev["reference"][0] == f"{ref:.4f}"
    # the verdict column says kept or broken, as the values say
    kept = evals[step]["rev"]["loss"] <= ref + 1e-12
    assert rev["verdict"] == (("✓ kept", "kept") if kept else ("✗ broken", "broken"))
    # a last step past the reference is marked in its cell
    assert ("✗" in rev["last (step 8)"][0]) == (evals[8]["rev"]["loss"] > ref + 1e-12)
    assert "verdict" not in add or "kept" not in add["verdict"][0]


def test_report_reads_final_selection_json_when_the_run_has_one(make_config):
    """final/selection.json (the exported answer) wins over summary.json's best_feasible."""
    run = _constrained(make_config)
    sel = {
        "rule": "best_feasible",
        "step": 4,
        "source": "checkpoint",
        "last_step": 8,
        "domains": {
            "add": {"role": "target", "value": 1.5, "reference": None, "slack": None, "kept": None},
            "rev": {
                "role": "constraint",
                "value": 9.0,
                "reference": 2.5,
                "slack": 0.0,
                "kept": False,
            },
        },
        "path": str(run / "final"),
    }
    (run / "final" / "selection.json").write_text(json.dumps(sel))
    page = write_report(run).read_text()
    rows = _answer_rows(page)
    assert rows["rev"]["answer (step 4)"][0] == "9.0000"
    assert rows["rev"]["reference"][0] == "2.5000"
    assert rows["rev"]["verdict"] == ("✗ broken", "broken")
    assert f"model: {run / 'final'}" in page and "0/1 constraints held" in page


def test_report_keeps_the_base_model_when_nothing_was_feasible(make_config):
    run = _constrained(make_config, reference=-1.0)  # no loss gets under -1
    page = write_report(run).read_text()
    rows = _answer_rows(page)
    assert "answer (base model)" in rows["rev"]
    # the answer is the base model's values, judged by the same rule (here it is past too)
    assert rows["rev"]["answer (base model)"] == rows["rev"]["base (step 0)"]
    assert rows["rev"]["verdict"] == ("✗ broken", "broken")
    assert "keep the base model" in page
    assert "✗" in rows["rev"]["last (step 8)"][0]


def test_plots_draw_references_the_answer_and_one_colour_per_domain(make_config, monkeypatch):
    """Every figure of the report, inspected: the constraint's reference is a dashed line at its
    value in the domain's colour, the answer's step a vertical line, and each domain (and the
    dataset of the same name) has one colour across weights, curves, training loss,
    predictions and heatmap labels — the config's order, not each plot's."""
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import to_hex

    run = _constrained(make_config)
    # a mixer's slopes at two updates and its predictions (the keys DynaMiCS logs)
    for step, v in ((4, 0.5), (8, -0.5)):
        RunDir(run).append_metrics(
            {
                "step": step,
                "mixer": {
                    "S": {"add": {"add": v, "rev": 0.1}, "rev": {"add": 0.2, "rev": -v}},
                    "anchor": {"add": 3.0 + v, "rev": 2.0},
                    "predicted": {"add": 2.5, "rev": 2.1},
                    "predicted_step": step + 4,
                    **({"realised": {"add": 3.5, "rev": 2.0}} if step == 8 else {}),
                    "horizon": 4,
                    "lambda": 5.0 * step,
                },
            }
        )
    figs = {}
    real_save = plots._save

    def keep(fig, path):
        figs[Path(path).name] = fig
        fig.canvas.draw()
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    page = write_report(run).read_text()
    best = json.loads((run / "summary.json").read_text())["best_feasible"]
    colours = plots.colour_map(["rev", "add"])
    assert colours["rev"] != colours["add"]

    ax = figs["eval_loss.png"].axes[0]
    refs = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert [(ln.get_label(), ln.get_ydata()[0]) for ln in refs] == [
        ("rev reference", best["references"]["rev"])
    ]
    assert to_hex(refs[0].get_color()) == colours["rev"]
    step = best["step"]
    marks = [ln for ln in ax.get_lines() if ln.get_label().startswith("answer")]
    assert len(marks) == 1 and marks[0].get_xdata()[0] == step

    seen: dict[str, set] = {"add": set(), "rev": set()}
    for name, fig in figs.items():
        for a in fig.axes:
            for ln in a.get_lines():
                if ln.get_label() in seen:
                    seen[ln.get_label()].add(to_hex(ln.get_color()))
            for coll in a.collections:
                if isinstance(coll, PolyCollection) and coll.get_label() in seen:
                    seen[coll.get_label()].add(to_hex(coll.get_facecolor()[0][:3]))
            if a.get_title() in seen:  # predictions: a panel per domain, title coloured
                seen[a.get_title()].add(to_hex(a.title.get_color()))
            for tick in a.get_xticklabels() + a.get_yticklabels():
                name_ = tick.get_text().split(" (")[0]
                if name_ in seen:
                    seen[name_].add(to_hex(tick.get_color()))
    assert seen == {"add": {colours["add"]}, "rev": {colours["rev"]}}
    assert {"weights.png", "train_loss.png", "mixer_predictions.png"} <= set(figs)
    # the slope matrix at each update, and the scalar that never moved folded, not drawn
    assert "<h2>mixer: S at each update</h2><img" in page
    assert "<h2>mixer: scalar diagnostics</h2><img" in page
    assert "<details><summary>1 diagnostic series that never moved" in page
    assert "mixer: horizon: horizon = 4" in page


def test_is_flat():
    assert plots.is_flat({"a": [(0, 1.0), (4, 1.0)], "b": [(0, 2.0)]})
    assert not plots.is_flat({"a": [(0, 1.0), (4, 1.0)], "b": [(0, 2.0), (4, 2.5)]})


def test_constrained_report_renders_its_verdicts_in_a_headless_browser(make_config, tmp_path):
    import numpy as np
    import pytest
    from PIL import Image

    from mixtune.report.browser import find_browser, rendered_text, screenshot

    if find_browser() is None:
        pytest.skip("no Chromium-family browser (Debian: apt-get install chromium)")
    run = _constrained(make_config)
    index = write_report(run)
    dom = rendered_text(index)
    rows = _answer_rows(dom)
    assert rows["rev"]["verdict"][1] in ("kept", "broken") and "The answer" in dom
    png = screenshot(index, tmp_path / "shot.png", width=900, height=700)
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert (pixels < 128).mean() > 0.01 and pixels.std() > 20
