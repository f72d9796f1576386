"""mixtune bench: a broken cell is recorded and the rest finish; an interrupted suite resumes."""

import json

import yaml

from mixtune import cli
from mixtune.suite import load_suite


def _suite(tmp_path, make_config, methods):
    base = make_config(max_steps=3)
    suite = {
        "output_dir": str(tmp_path / "bench"),
        "parallel": 2, "threads": 1, "seeds": [0],
        "base": {k: base[k] for k in ("max_steps", "model", "train")},
        "scenarios": [{"name": "toy", "datasets": base["datasets"], "evals": [
            {**base["evals"][0], "role": "target"},
            {**base["evals"][1], "role": "constraint"}]}],
        "methods": methods,
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_broken_cell_is_recorded_and_resume_skips_finished(tmp_path, make_config, capsys):
    path = _suite(tmp_path, make_config, [
        {"name": "proportional", "mixer": {"name": "proportional"}},
        {"name": "uniform", "mixer": {"name": "uniform"}},
        {"name": "broken", "mixer": {"name": "fixed", "weights": {"nope": 1}}},
    ])
    assert cli.main(["bench", str(path)]) == 0
    cells = tmp_path / "bench/cells"
    assert (cells / "toy--proportional--s0/summary.json").is_file()
    assert (cells / "toy--uniform--s0/summary.json").is_file()
    assert "unknown dataset name" in (cells / "toy--broken--s0/error.txt").read_text()
    rows = {r["method"]: r for r in json.loads((tmp_path / "bench/results.json").read_text())}
    assert rows["broken"]["failed"] == 1 and rows["proportional"]["failed"] == 0
    assert rows["proportional"]["cost"] == 1.0
    assert rows["uniform"]["target_delta"] is not None
    for ext in ("md", "csv", "html"):
        assert (tmp_path / f"bench/results.{ext}").stat().st_size > 0

    # Interrupted suite: one finished cell lost its summary; only that one reruns.
    stamp = (cells / "toy--proportional--s0/summary.json").stat().st_mtime_ns
    (cells / "toy--uniform--s0/summary.json").unlink()
    capsys.readouterr()
    assert cli.main(["bench", str(path)]) == 0
    assert "1 already done, running 2" in capsys.readouterr().out  # uniform + the broken one
    assert (cells / "toy--proportional--s0/summary.json").stat().st_mtime_ns == stamp
    assert (cells / "toy--uniform--s0/summary.json").is_file()


def test_builtin_suites_load():
    for name in ("quick",):
        suite = load_suite(name)
        assert suite.methods and suite.scenarios
