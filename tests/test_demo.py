"""`mixtune demo --quick` runs, and it shows what it promises: fine-tuning on the targets alone
erodes a constraint domain that the balanced (uniform) mixture keeps."""

from html.parser import HTMLParser

import pytest

from mixtune import cli
from mixtune.demo import EVALS, TOLERANCE


def test_quick_demo_shows_erosion_that_balance_prevents(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| trivia | constraint |" in out and "kept" in out and "broken" in out
    import json

    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res) == {"target-only", "uniform"}
    constraints = [d for d, role, _ in EVALS if role == "constraint"]

    def kept(name, d):
        return res[name]["after"][d]["loss"] <= res[name]["before"][d]["loss"] + TOLERANCE

    eroded = [d for d in constraints if not kept("target-only", d) and kept("uniform", d)]
    assert eroded, res
    # both mixtures learn the targets
    for name in res:
        assert res[name]["after"]["code"]["loss"] < res[name]["before"]["code"]["loss"]
    HTMLParser().feed((tmp_path / "report.html").read_text())
    for name in res:
        assert (tmp_path / name / "report/weights.png").stat().st_size > 1000


@pytest.mark.slow
def test_demo_numbers_are_reproducible_with_a_seed(tmp_path):
    """Same seed, same numbers: two runs of a demo mixture give identical before/after tables."""
    from mixtune.demo import run_demo

    first = run_demo(tmp_path / "a", quick=True, seed=3, only=["uniform"])
    second = run_demo(tmp_path / "b", quick=True, seed=3, only=["uniform"])
    for res in (first, second):
        res["uniform"].pop("seconds")
    assert first == second
