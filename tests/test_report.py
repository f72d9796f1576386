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
