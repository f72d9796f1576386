from html.parser import HTMLParser

from mixtune import cli, config
from mixtune.engine.loop import Trainer
from mixtune.engine.rundir import RunDir
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
