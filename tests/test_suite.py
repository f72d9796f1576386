"""mixtune bench: a broken cell is recorded and the rest finish; an interrupted suite resumes;
references are per seed; planner bounds and the paper protocol, end to end (the table's logic on
hand-written cells: test_suite_table.py)."""

import json
from pathlib import Path

import pytest
import yaml

from mixtune import cli
from mixtune.errors import ConfigError
from mixtune.suite.cell import cells
from mixtune.suite.config import load_suite
from mixtune.suite.runner import check_suite


def _suite(tmp_path, make_config, methods, **top):
    base = make_config(max_steps=3)
    suite = {
        "output_dir": str(tmp_path / "bench"),
        "parallel": 2,
        "threads": 1,
        "seeds": [0],
        "base": {k: base[k] for k in ("max_steps", "model", "train")},
        "scenarios": [
            {
                "name": "toy",
                "datasets": base["datasets"],
                "evals": [
                    {**base["evals"][0], "role": "target"},
                    {**base["evals"][1], "role": "constraint"},
                ],
            }
        ],
        "methods": methods,
        **top,
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_broken_cell_is_recorded_resume_skips_finished_and_losses_are_rows(
    tmp_path, make_config, capsys
):
    path = _suite(
        tmp_path,
        make_config,
        [
            {"name": "proportional", "mixer": {"name": "proportional"}},
            {"name": "prop-dft", "mixer": {"name": "proportional"}, "loss": {"name": "dft"}},
            {"name": "prop-cadft", "mixer": {"name": "proportional"}, "loss": {"name": "cadft"}},
            {"name": "broken", "mixer": {"name": "fixed", "weights": {"nope": 1}}},
        ],
    )
    assert cli.main(["bench", str(path)]) == 0
    root, cells_dir = tmp_path / "bench", tmp_path / "bench/cells"
    for name in ("proportional", "prop-dft", "prop-cadft"):
        assert (cells_dir / f"toy--{name}--s0/summary.json").is_file()
    assert "unknown dataset name" in (cells_dir / "toy--broken--s0/error.txt").read_text()
    rows = {r["method"]: r for r in json.loads((root / "results.json").read_text())}
    assert rows["broken"]["failed"] == 1 and rows["proportional"]["failed"] == 0
    assert rows["proportional"]["cost"] == 1.0
    # The loss axis: separate rows, and those cells really trained with dft / cadft.
    for name in ("dft", "cadft"):
        assert rows[f"prop-{name}"]["failed"] == 0
        assert rows[f"prop-{name}"]["target_delta"] is not None
        ran = yaml.safe_load((cells_dir / f"toy--prop-{name}--s0/cell.yaml").read_text())
        assert ran["loss"] == {"name": name}
    assert rows["prop-dft"]["target_delta"] != rows["prop-cadft"]["target_delta"]
    md, html = (root / "results.md").read_text(), (root / "results.html").read_text()
    csv_rows = (root / "results.csv").read_text().splitlines()
    for name in ("proportional", "prop-dft", "prop-cadft", "broken"):
        assert f"| {name} |" in md and f"<td>{name}</td>" in html
        assert any(r.startswith(name + ",") for r in csv_rows)

    # Interrupted suite: one finished cell lost its summary; only that one reruns.
    stamp = (cells_dir / "toy--proportional--s0/summary.json").stat().st_mtime_ns
    (cells_dir / "toy--prop-dft--s0/summary.json").unlink()
    capsys.readouterr()
    assert cli.main(["bench", str(path)]) == 0
    assert "2 already done, running 2" in capsys.readouterr().out  # prop-dft + the broken one
    assert (cells_dir / "toy--proportional--s0/summary.json").stat().st_mtime_ns == stamp
    assert (cells_dir / "toy--prop-dft--s0/summary.json").is_file()


def test_builtin_suites_load_and_every_cell_validates():
    for name in ("quick", "standard", "extended"):
        suite = load_suite(name)
        assert suite.methods and suite.scenarios
        assert suite.protocol == "paper" and suite.reference_slack is None  # strict references
        assert check_suite(suite) == len([c for c in cells(suite) if c.alias_of is None])
    assert cli.main(["bench", "standard", "--check"]) == 0
    std, ext = load_suite("standard"), load_suite("extended")
    assert std.parallel == 2 and std.threads == 1
    assert {m.name for m in std.methods} == {
        "fixed-sweep",
        "proportional",
        "dynamixsft",
        "dynamics",
    }
    assert {"temperature", "exp3", "mergemix", "prop-dft", "prop-cadft", "dynamics-noise"} <= {
        m.name for m in ext.methods
    }
    assert std.base["model"]["name_or_path"] == "builtin-bench"
    assert ext.scenarios == std.scenarios and ext.base == std.base
    # the paper's sweep: 5 runs per scenario whose targets have equal budgets, up to 9 else
    runs = [c for c in cells(std) if c.alias_of is None]
    assert len(runs) == 168
    sweep_runs = [c for c in runs if c.method.point is not None and c.seed == 0]
    assert {sum(c.scenario is sc for c in sweep_runs) for sc in std.scenarios} == {5, 9}
    # long enough for each method's schedule: DynaMiCS >= 6 updates, DynamixSFT >= 30
    from mixtune.mixers.dynamics.schedule import schedule_steps

    mix = {m.name: m.mixer for m in std.methods}
    steps = std.base["max_steps"]
    assert len(schedule_steps(mix["dynamics"]["schedule"], steps)) >= 6
    assert steps // mix["dynamixsft"]["update_every"] >= 30
    for sc in std.scenarios:
        roles = [e.get("role") for e in sc.evals]
        assert 1 <= roles.count("target") <= 3 and roles.count("constraint") >= 3
        assert any(d["path"] == "builtin:replay" for d in sc.datasets)  # the regulariser
    # the real-model benchmark's suite validates too (its model is only loaded when it runs)
    real = load_suite(str(Path(__file__).parents[1] / "bench" / "suites" / "smollm2.yaml"))
    assert check_suite(real) == 7


def test_mergemix_planned_method_counts_planning_and_reuses_the_plan(tmp_path, make_config, capsys):
    planner = {
        "name": "mergemix",
        "experts": {"steps": 2},
        "search": {"n_seeds": 3, "n_candidates": 200, "surrogate": "quadratic", "eval_batches": 1},
    }
    path = _suite(
        tmp_path, make_config, [{"name": "mergemix", "planner": planner}], reference_slack=0.25
    )
    assert cli.main(["bench", str(path)]) == 0
    root = tmp_path / "bench"
    plan_dir, cell = root / "plans/toy--mergemix--s0", root / "cells/toy--mergemix--s0"
    plan = json.loads((plan_dir / "plan.json").read_text())
    ran = yaml.safe_load((cell / "cell.yaml").read_text())
    assert ran["mixer"] == {"name": "fixed", "weights": plan["weights"]}
    # reference_slack: the trained cell's reference is the base model's loss on the cell's
    # examples (both batches) + 0.25 ...
    base = json.loads((root / "references.json").read_text())["toy"]["0"]["loss"]
    ref = next(e["reference"] for e in ran["evals"] if e["role"] == "constraint")
    assert ref == pytest.approx(base["rev"] + 0.25, abs=1e-5)
    # ... while the planner scores merges on 1 batch: it bounds the constraint by its own base
    # measurement on that batch + 0.25, so the base model keeps its own bound
    assert [b["limit"] for b in plan["bounds"]] == [
        pytest.approx(plan["base"]["rev"]["loss"] + 0.25)
    ]
    for b in plan["bounds"]:
        assert b["upper"] and plan["base"][b["domain"]][b["metric"]] <= b["limit"]
    plan_s = float((plan_dir / "seconds.txt").read_text())
    train_s = json.loads((cell / "summary.json").read_text())["seconds"]
    wall = float((cell / "wall.txt").read_text())
    assert plan_s > 0 and wall > plan_s + train_s  # planning is part of the cell's time
    row = json.loads((root / "results.json").read_text())[0]
    assert row["failed"] == 0 and row["plan_seconds"] == plan_s and row["seconds"] == wall

    # Resume: the planned cell's training is lost, the cached plan is reused (not replanned).
    stamp = (plan_dir / "plan.json").stat().st_mtime_ns
    (cell / "summary.json").unlink()
    capsys.readouterr()
    assert cli.main(["bench", str(path)]) == 0
    assert "0 already done, running 1" in capsys.readouterr().out
    assert (plan_dir / "plan.json").stat().st_mtime_ns == stamp
    assert float((cell / "plan_seconds.txt").read_text()) == plan_s
    assert float((cell / "wall.txt").read_text()) > plan_s


def test_suite_options_are_validated(tmp_path, make_config):
    path = _suite(tmp_path, make_config, [{"name": "x", "planner": {"name": "doremi"}}])
    with pytest.raises(ConfigError, match="planner.name"):
        load_suite(str(path))
    path = _suite(tmp_path, make_config, [{"name": "a b"}])
    with pytest.raises(ConfigError, match="methods"):
        load_suite(str(path))
    path = _suite(
        tmp_path,
        make_config,
        [
            {"name": "t", "mixer": {"name": "fixed", "weights": "targets"}},
            {"name": "bad", "mixer": {"name": "fixed", "weights": {"nope": 1}}},
        ],
    )
    with pytest.raises(ConfigError, match="cell toy--bad--s0: mixer.weights.nope"):
        check_suite(load_suite(str(path)))


def test_references_are_per_seed_and_are_each_seeds_base_loss(tmp_path, make_config):
    # a suite with two seeds: each seed's cells evaluate their own seeded draw of examples
    sweep = {"name": "fixed-sweep", "sweep": {"masses": [0.5], "schemes": ["uniform"]}}
    path = _suite(tmp_path, make_config, [sweep], reference_slack=0.25, seeds=[0, 1])
    root = tmp_path / "bench"
    root.mkdir()
    (root / "references.json").write_text(json.dumps({"toy": {"add": 9.0, "rev": 9.0}}))
    assert cli.main(["bench", str(path), "base.max_steps=1"]) == 0
    refs = json.loads((root / "references.json").read_text())
    assert refs["format"] == 2  # the old, seedless cache was not used
    per_seed = {seed: refs["toy"][str(seed)]["loss"] for seed in (0, 1)}
    assert per_seed[0] != per_seed[1]
    for seed in (0, 1):
        cell = root / f"cells/toy--fixed-uniform-w0.5--s{seed}"
        first = json.loads((cell / "metrics.jsonl").read_text().splitlines()[0])
        assert first["step"] == 0
        for d in ("add", "rev"):
            assert per_seed[seed][d] == pytest.approx(first["eval"][d]["loss"], abs=1e-5)
        ran = yaml.safe_load((cell / "cell.yaml").read_text())
        assert ran["mixer"] == {"name": "fixed", "weights": {"add": 0.5, "rev": 0.5}}
        rev = next(e for e in ran["evals"] if e["name"] == "rev")
        assert rev["reference"] == pytest.approx(per_seed[seed]["rev"] + 0.25, abs=1e-5)
    rows = {r["method"]: r for r in json.loads((root / "results.json").read_text())}
    assert set(rows) == {"fixed-uniform-w0.5", "fixed-sweep: best single", "fixed-sweep: oracle"}
    assert rows["fixed-uniform-w0.5"]["cells"] == 2 and rows["fixed-uniform-w0.5"]["failed"] == 0
    assert rows["fixed-sweep: best single"]["config"] == "fixed-uniform-w0.5"


def _check_quick(out, max_steps=None):
    args = ["bench", "quick", f"output_dir={out}"]
    if max_steps:  # CI: the real quick suite, shortened
        args += [f"base.max_steps={max_steps}", f"base.train.eval_every={max_steps}"]
    assert cli.main(args) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(rows) == {m.name for m in load_suite("quick").methods}
    assert all(r["failed"] == 0 and r["target_delta"] is not None for r in rows.values()), rows
    # the paper protocol: dev for selection, test twins logged beside, reported on test
    assert all(
        r["reported_on"] == "test" and r["test_ppl_delta"] is not None and r["feasible"] is not None
        for r in rows.values()
    ), rows
    cell = out / "cells/code-vs-general--proportional--s0"
    ran = {e["name"]: e for e in yaml.safe_load((cell / "cell.yaml").read_text())["evals"]}
    assert ran["code"]["split"] == "dev" and ran["code-test"]["split"] == "test"
    assert ran["code-test"]["role"] == "test" and ran["code-test"]["test_of"] == "code"
    last = json.loads((cell / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"code", "code-test", "trivia-test", "safety-test"} <= set(last["eval"])
    assert "test PPL Δ%" in (out / "results.md").read_text()


def test_quick_suite_runs_shortened(tmp_path):
    _check_quick(tmp_path / "quick", max_steps=2)


@pytest.mark.slow
def test_quick_suite_runs_in_full(tmp_path):
    _check_quick(tmp_path / "quick")


def test_a_resumed_cell_counts_the_time_its_checkpoint_kept(tmp_path, make_config, monkeypatch):
    """An interrupted cell resumes from its newest checkpoint: its cost is the training time
    that checkpoint kept (the run's ``resumed_seconds``; tests/test_engine.py shows the run
    reports it) plus the resumed process's wall time, not the last attempt alone."""
    from mixtune.suite import runner

    path = _suite(
        tmp_path, make_config, [{"name": "proportional", "mixer": {"name": "proportional"}}]
    )
    suite = load_suite(str(path))
    cell = next(c for c in cells(suite) if c.alias_of is None)
    out = tmp_path / "bench/cells" / cell.key
    kept = {"value": 0.0}

    def attempt(*a, **k):  # one process: 5 s of wall time, resuming with what was kept
        (out / "summary.json").write_text(json.dumps({"resumed_seconds": kept["value"]}))
        return True, 5.0

    monkeypatch.setattr(runner, "_run", attempt)
    runner.run_cell(suite, cell, out, None)
    assert float((out / "wall.txt").read_text()) == 5.0  # fresh: nothing kept
    kept["value"] = 100.0
    runner.run_cell(suite, cell, out, None)
    assert float((out / "wall.txt").read_text()) == 105.0
