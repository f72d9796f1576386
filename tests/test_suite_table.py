"""mixtune bench's reading of results, on hand-written cells: the paper's checkpoint selection
(select on dev, report on test, infeasible scores 0), medians of per-scenario means with the
seed range, the fixed-weight sweep (expansion, weights, shared cells) and its best-single and
oracle rows, and the paper protocol's evaluation domains."""

import json
import math
from pathlib import Path

import pytest
import yaml

from mixtune.errors import ConfigError
from mixtune.suite.cell import cell_raw, cells, plan_config, scenario_evals
from mixtune.suite.config import load_suite, methods_of
from mixtune.suite.results import write_tables
from mixtune.suite.runner import check_suite
from mixtune.suite.sweep import SweepPoint, sweep_weights
from mixtune.suite.table import aggregate, select

DOMAINS = {
    "t": {"role": "target", "reference": None, "metric": "loss", "test_of": None},
    "c": {"role": "constraint", "reference": None, "metric": "loss", "test_of": None},
    "t-test": {"role": "test", "reference": None, "metric": "loss", "test_of": "t"},
}


def _ev(t, c, t_test):
    return {"t": {"loss": t}, "c": {"loss": c}, "t-test": {"loss": t_test}}


def test_a_feasible_earlier_step_is_credited_with_its_test_numbers():
    evals = [
        (0, _ev(2.0, 1.0, 2.1)),
        (4, _ev(1.5, 0.9, 1.6)),  # feasible
        (8, _ev(1.4, 1.0, 1.7)),  # feasible (constraint == reference), lower target
        (12, _ev(1.2, 1.1, 1.3)),
    ]  # the end: lowest target, but the constraint broke
    r = select(evals, DOMAINS)
    assert r["feasible"] and r["selected_step"] == 8 and r["reported_on"] == "test"
    assert r["test_ppl_delta"] == pytest.approx(1 - math.exp(1.7 - 2.1))
    assert r["test_loss_delta"] == pytest.approx(0.4 / 2.1)


def test_an_infeasible_cell_scores_zero():
    # never keeps the constraint; or keeps it without improving the target: both infeasible
    for later in (
        [(5, _ev(1.0, 1.2, 1.0)), (10, _ev(0.5, 1.01, 0.5))],
        [(5, _ev(2.0, 0.5, 1.0)), (10, _ev(2.5, 0.5, 0.5))],
    ):
        r = select([(0, _ev(2.0, 1.0, 2.0))] + later, DOMAINS)
        assert r == {
            "selected_step": None,
            "feasible": False,
            "test_ppl_delta": 0.0,
            "test_loss_delta": 0.0,
            "reported_on": "test",
        }
    # step 0 itself never counts, even though the base keeps every reference
    assert not select([(0, _ev(2.0, 1.0, 2.0))], DOMAINS)["feasible"]


def test_stated_references_multiple_targets_and_no_test_twin():
    doms = {
        **DOMAINS,
        "c": {**DOMAINS["c"], "reference": 1.25},
        "u": {"role": "target", "reference": None, "metric": "loss", "test_of": None},
        "u-test": {"role": "test", "reference": None, "metric": "loss", "test_of": "u"},
    }
    base = {**_ev(2.0, 1.0, 2.0), "u": {"loss": 3.0}, "u-test": {"loss": 3.0}}
    step = {**_ev(1.0, 1.2, 1.5), "u": {"loss": 3.5}, "u-test": {"loss": 2.9}}
    r = select([(0, base), (6, step)], doms)  # c = 1.2 <= its stated 1.25; t + u = 4.5 < 5
    assert r["selected_step"] == 6
    assert r["test_ppl_delta"] == pytest.approx(1 - math.exp(((1.5 - 2.0) + (2.9 - 3.0)) / 2))
    assert r["test_loss_delta"] == pytest.approx(0.6 / 5.0)
    # a target without a test twin is reported on its selection split
    no_twin = {d: i for d, i in DOMAINS.items() if d != "t-test"}
    r = select([(0, _ev(2.0, 1.0, 9)), (4, _ev(1.5, 0.9, 9))], no_twin)
    assert r["reported_on"] == "eval" and r["test_ppl_delta"] == pytest.approx(1 - math.exp(-0.5))


def test_accuracy_constraints_must_not_drop():
    doms = {**DOMAINS, "c": {**DOMAINS["c"], "metric": "accuracy"}}
    base = {**_ev(2.0, 1.0, 2.0), "c": {"loss": 1.0, "accuracy": 0.5}}
    worse = {**_ev(1.0, 0.5, 1.0), "c": {"loss": 0.5, "accuracy": 0.4}}
    better = {**_ev(1.5, 1.5, 1.5), "c": {"loss": 1.5, "accuracy": 0.5}}
    assert select([(0, base), (4, worse), (8, better)], doms)["selected_step"] == 8


# ---------------------------------------------------------------------------------------------
# A synthetic grid: two scenarios x two seeds x a sweep (4 members, two of them coinciding)


def _grid_suite(tmp_path, **top) -> Path:
    datasets = [
        {"name": "a", "path": "a.jsonl", "max_examples": 100},
        {"name": "b", "path": "b.jsonl", "max_examples": 300},
        {"name": "c", "path": "c.jsonl", "max_examples": 100},
    ]
    evals = [
        {"name": "a", "path": "builtin:code", "split": "eval", "role": "target"},
        {"name": "b", "path": "builtin:arithmetic", "split": "eval", "role": "target"},
        {"name": "c", "path": "builtin:trivia", "split": "eval", "role": "constraint"},
    ]
    suite = {
        "output_dir": str(tmp_path / "bench"),
        "seeds": [0, 1],
        "baseline": "fixed-uniform-w0",
        "scenarios": [
            {"name": "sA", "datasets": datasets, "evals": evals},
            {"name": "sB", "datasets": datasets, "evals": evals},
        ],
        "methods": [{"name": "fixed-sweep", "sweep": {"masses": [0, 0.5]}}],
        **top,
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def _write_cell(
    root: Path, key: str, evals: list[dict], gain: float | None, seconds: float = 10.0
) -> None:
    """A finished cell: base at step 0, a feasible step 5 whose test PPL Δ is ``gain`` (None:
    no feasible step), and a last step 10 that broke the constraint."""
    out = root / "cells" / key
    out.mkdir(parents=True)
    (out / "cell.yaml").write_text(yaml.safe_dump({"evals": evals}))
    base = {d["name"]: {"loss": 2.0} for d in evals}
    base["c"] = {"loss": 1.0}
    test_loss = 2.0 + math.log(1 - gain) if gain is not None else 2.0
    mid = {
        "a": {"loss": 1.5},
        "b": {"loss": 1.5},
        "c": {"loss": 0.9 if gain is not None else 1.1},
        "a-test": {"loss": test_loss},
        "b-test": {"loss": test_loss},
    }
    end = {**mid, "a": {"loss": 1.0}, "c": {"loss": 1.5}}
    recs = [
        {"step": 0, "eval": base},
        {"step": 2, "loss": 1.9},
        {"step": 5, "eval": mid},
        {"step": 10, "eval": end},
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (out / "summary.json").write_text(json.dumps({"seconds": seconds}))


GAINS = {  # member -> scenario -> per-seed test PPL reduction (None: infeasible)
    "fixed-uniform-w0": {"sA": [0.0, 0.0], "sB": [0.0, 0.0]},
    "fixed-uniform-w0.5": {"sA": [0.10, 0.20], "sB": [0.0, 0.02]},
    "fixed-proportional-w0.5": {"sA": [0.05, 0.05], "sB": [0.09, None]},
}


def test_sweep_rows_best_single_and_oracle_on_a_synthetic_grid(tmp_path):
    suite = load_suite(str(_grid_suite(tmp_path)))
    all_cells = cells(suite)
    runs = [c for c in all_cells if c.alias_of is None]
    assert len(all_cells) == 16 and len(runs) == 12  # proportional-w0 == uniform-w0: shared
    root = Path(suite.output_dir)
    for c in runs:
        evals = cell_raw(suite, c, root / "cells" / c.key, None)["evals"]
        _write_cell(root, c.key, evals, GAINS[c.method.name][c.scenario.name][c.seed])
    rows = {r["method"]: r for r in aggregate(suite, all_cells)}
    assert list(rows) == [
        "fixed-uniform-w0",
        "fixed-uniform-w0.5",
        "fixed-proportional-w0",
        "fixed-proportional-w0.5",
        "fixed-sweep: best single",
        "fixed-sweep: oracle",
    ]
    u5, p5 = rows["fixed-uniform-w0.5"], rows["fixed-proportional-w0.5"]
    # median over scenarios of the mean over seeds; the infeasible cell counts as 0
    assert u5["test_ppl_delta"] == pytest.approx((0.15 + 0.01) / 2)
    assert p5["test_ppl_delta"] == pytest.approx((0.05 + 0.045) / 2)
    assert p5["feasible"] == 0.75 and p5["feasible_end"] == 0.0 and p5["selected_step"] == 5
    # seed range: per seed, the median over scenarios
    assert (u5["ppl_seed_min"], u5["ppl_seed_max"]) == (pytest.approx(0.05), pytest.approx(0.11))
    assert rows["fixed-proportional-w0"]["test_ppl_delta"] == 0.0
    assert rows["fixed-proportional-w0"]["per_cell"][0]["run"] == "sA--fixed-uniform-w0--s0"
    best = rows["fixed-sweep: best single"]
    assert best["config"] == "fixed-uniform-w0.5"
    assert best["test_ppl_delta"] == u5["test_ppl_delta"]
    oracle = rows["fixed-sweep: oracle"]  # sA: uniform-w0.5 (0.15); sB: proportional (0.045)
    assert oracle["config"] == {"sA": "fixed-uniform-w0.5", "sB": "fixed-proportional-w0.5"}
    assert oracle["test_ppl_delta"] == pytest.approx((0.15 + 0.045) / 2)
    assert oracle["ppl_seed_min"] == pytest.approx(0.095)  # seed 0: median(0.10, 0.09)
    assert oracle["ppl_seed_max"] == pytest.approx(0.10)  # seed 1: median(0.20, 0.0)
    # finding the oracle takes the whole sweep: 3 distinct runs of 10 s per scenario and seed
    assert oracle["seconds"] == 30 and oracle["cost"] == 3.0 and u5["cost"] == 1.0

    write_tables(suite, list(rows.values()))
    md = (root / "results.md").read_text()
    assert "| fixed-sweep: best single (fixed-uniform-w0.5) | 8.0% | 5.0–11.0% |" in md
    assert "test PPL Δ%" in md and "feasible (end)" in md and "step" in md
    csv_head = (root / "results.csv").read_text().splitlines()[0].split(",")
    assert {
        "test_ppl_delta",
        "ppl_seed_min",
        "ppl_seed_max",
        "selected_step",
        "feasible_end",
        "config",
    } <= set(csv_head)
    assert len((root / "cells.csv").read_text().splitlines()) == 1 + 16
    html = (root / "results.html").read_text()
    assert "fixed-sweep: oracle" in html and "seed range" in html
    assert (root / "quality_vs_cost.png").is_file()
    saved = {r["method"]: r for r in json.loads((root / "results.json").read_text())}
    assert saved["fixed-sweep: oracle"]["config"]["sB"] == "fixed-proportional-w0.5"


def test_sweep_expansion_and_weights(tmp_path):
    suite = load_suite(str(_grid_suite(tmp_path)))
    assert [m.name for m in methods_of(suite)] == [
        "fixed-uniform-w0",
        "fixed-uniform-w0.5",
        "fixed-proportional-w0",
        "fixed-proportional-w0.5",
    ]
    sc = suite.scenarios[0]
    assert sweep_weights(sc, SweepPoint("s", "uniform", 0.5)) == {"a": 0.25, "b": 0.25, "c": 0.5}
    assert sweep_weights(sc, SweepPoint("s", "proportional", 0.8)) == {
        "a": 0.2,
        "b": 0.6,
        "c": pytest.approx(0.2),
    }  # by max_examples: 100 vs 300
    # one target: the schemes coincide; no non-target: every mass is w = 1
    one = {
        "name": "x",
        "datasets": [
            {"name": "a", "path": "builtin:code"},
            {"name": "c", "path": "builtin:trivia"},
        ],
        "evals": [{"name": "a", "path": "builtin:code", "role": "target"}],
    }
    only = {**one, "name": "y", "datasets": one["datasets"][:1]}
    suite = load_suite(str(_grid_suite(tmp_path, scenarios=[one, only], seeds=[0])))
    by_sc = {}
    for c in cells(suite):
        by_sc.setdefault(c.scenario.name, []).append(c.alias_of)
    assert by_sc["x"] == [None, None, "x--fixed-uniform-w0--s0", "x--fixed-uniform-w0.5--s0"]
    assert by_sc["y"] == [None] + ["y--fixed-uniform-w0--s0"] * 3
    assert sweep_weights(suite.scenarios[1], SweepPoint("s", "uniform", 0.0)) == {"a": 1.0}
    # proportional counts come from the dataset when max_examples is not given
    assert sweep_weights(suite.scenarios[0], SweepPoint("s", "proportional", 0.5)) == {
        "a": 0.5,
        "c": 0.5,
    }


def test_sweep_validation_and_check(tmp_path):
    with pytest.raises(ConfigError, match="sweep.masses"):
        load_suite(str(_grid_suite(tmp_path, methods=[{"name": "f", "sweep": {"masses": [2]}}])))
    with pytest.raises(ConfigError, match="schemes"):
        load_suite(
            str(
                _grid_suite(
                    tmp_path, methods=[{"name": "f", "sweep": {"schemes": ["uniform", "greedy"]}}]
                )
            )
        )
    with pytest.raises(ConfigError, match="used twice"):
        load_suite(
            str(
                _grid_suite(
                    tmp_path,
                    methods=[{"name": "fixed-sweep", "sweep": {}}, {"name": "fixed-uniform-w1"}],
                )
            )
        )
    no_target = {
        "name": "z",
        "datasets": [
            {"name": "a", "path": "builtin:code"},
            {"name": "c", "path": "builtin:trivia"},
        ],
        "evals": [{"name": "q", "path": "builtin:code", "role": "target"}],
    }
    suite = load_suite(str(_grid_suite(tmp_path, scenarios=[no_target], seeds=[0])))
    with pytest.raises(ConfigError, match="cell z--fixed-uniform-w0--s0: .*named like a target"):
        check_suite(suite)


def test_paper_protocol_evaluates_dev_with_test_twins(tmp_path):
    evals = [
        {
            "name": "code",
            "path": "builtin:code",
            "split": "eval",
            "role": "target",
            "batches": 3,
            "batch_size": 4,
        },
        {
            "name": "triv",
            "path": "builtin:trivia",
            "split": "eval",
            "role": "constraint",
            "reference": 2.0,
        },
        {"name": "defs", "path": "builtin:definitions", "split": "eval", "role": "monitor"},
        {
            "name": "hub",
            "path": "some/hub-set",
            "split": "validation",
            "test_split": "test",
            "role": "constraint",
        },
        {"name": "held", "from_dataset": "a", "role": "constraint"},
    ]
    sc = {
        "name": "p",
        "datasets": [
            {"name": "a", "path": "builtin:code"},
            {"name": "b", "path": "builtin:trivia"},
        ],
        "evals": evals,
    }
    paper = load_suite(str(_grid_suite(tmp_path, scenarios=[sc])))
    got = {e["name"]: e for e in scenario_evals(paper, paper.scenarios[0])}
    assert list(got) == [
        "code",
        "triv",
        "defs",
        "hub",
        "held",
        "code-test",
        "triv-test",
        "hub-test",
    ]
    assert got["code"]["split"] == "dev" and got["triv"]["split"] == "dev"
    assert got["code-test"] == {
        **got["code"],
        "name": "code-test",
        "split": "test",
        "role": "test",
        "test_of": "code",
    }
    assert "reference" not in got["triv-test"] and got["triv"]["reference"] == 2.0
    assert got["defs"]["split"] == "eval"  # monitors are not reported: unchanged
    assert got["hub"]["split"] == "validation" and got["hub-test"]["split"] == "test"
    assert "test_split" not in got["hub"] and "held-test" not in got
    end = load_suite(str(_grid_suite(tmp_path, scenarios=[sc], protocol="end")))
    got = scenario_evals(end, end.scenarios[0])
    assert [e["name"] for e in got] == [e["name"] for e in evals]
    assert got[0]["split"] == "eval" and "test_split" not in got[3]
    assert load_suite("quick").protocol == "paper" == load_suite("standard").protocol


def test_planner_cells_leave_references_and_test_twins_to_the_planner(tmp_path):
    planner = {"name": "mergemix", "search": {"eval_batches": 2}}
    suite = load_suite(
        str(
            _grid_suite(
                tmp_path, reference_slack=0.05, methods=[{"name": "mm", "planner": planner}]
            )
        )
    )
    cell = cells(suite)[0]
    refs = {"sA": {0: {"a": 1.0, "b": 2.0, "c": 3.0}}}
    raw = cell_raw(suite, cell, tmp_path / "cell", refs)
    # the trained cell: the suite's reference for the seed (all batches) + the stated slack
    assert next(e for e in raw["evals"] if e["name"] == "c")["reference"] == 3.05
    plan = plan_config(suite, cell, raw, tmp_path / "plan")
    # the plan: the planner's own base measurement (its eval batches) + the same slack
    assert plan["reference_slack"] == 0.05
    assert all("reference" not in e for e in plan["run"]["evals"])
    assert [e["name"] for e in plan["run"]["evals"]] == ["a", "b", "c"]
    assert {e["split"] for e in plan["run"]["evals"]} == {"dev"}


def test_planner_cells_plan_the_run_with_the_scenarios_overrides(tmp_path):
    methods = [{"name": "mm", "planner": {"name": "mergemix", "experts": {"steps": 2}}}]
    path = _grid_suite(tmp_path, methods=methods, base={"max_steps": 4})
    suite = load_suite(str(path), ["scenarios.sA.overrides=[max_steps=7]"])
    cell = cells(suite)[0]
    raw = cell_raw(suite, cell, tmp_path / "cell", None)
    plan = plan_config(suite, cell, raw, tmp_path / "plan")
    # the cell trains with max_steps=7 (its overrides): so does the run the planner plans
    assert raw["max_steps"] == 4 and plan["run"]["max_steps"] == 7
    assert plan["experts"] == {"steps": 2} and plan["output_dir"] == str(tmp_path / "plan")
    assert "reference_slack" not in plan  # none stated: the planner's own default


def test_mergemix_reference_slack_is_added_to_its_own_base_values(make_config):
    from mixtune.planners.mergemix.config import bounds_of, load

    run = make_config()
    run["evals"][0].update(role="constraint")  # add: the base model's value + the slack
    run["evals"][1].update(role="constraint", reference=2.0)  # rev: stated, kept as is
    pc, rc = load(None, data={"run": run, "reference_slack": 0.25})
    base = {"add": {"loss": 3.0, "accuracy": 0.2}, "rev": {"loss": 4.0}}
    assert [(b.domain, b.limit) for b in bounds_of(pc, rc, base)] == [
        ("add", 3.25),
        ("rev", 2.0),
    ]
    pc, rc = load(
        None,
        data={"run": run, "reference_slack": 0.25, "constraints": {"add": {"metric": "accuracy"}}},
    )
    assert [(b.domain, b.limit) for b in bounds_of(pc, rc, base)][0] == ("add", 0.2)
    with pytest.raises(ConfigError, match="reference_slack"):
        load(None, data={"run": run, "reference_slack": -1})
