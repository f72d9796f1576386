"""bench/suite_analysis.py's DynaMiCS feasibility table counts what the cells logged."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location(
        "suite_analysis", ROOT / "bench/suite_analysis.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cell(method, n_feasible, constraint_end):
    domains = {
        "t": {"role": "target", "reference": None, "metric": "loss", "test_of": None},
        "c": {"role": "constraint", "reference": None, "metric": "loss", "test_of": None},
    }
    evals = [
        (0, {"t": {"loss": 2.0}, "c": {"loss": 1.0}}),
        (32, {"t": {"loss": 1.5}, "c": {"loss": constraint_end}}),
    ]
    recs = [{"step": s, "mixer": {"n_feasible": n}} for s, n in zip((0, 8, 16), n_feasible)]
    return {"method": method, "recs": recs, "evals": evals, "domains": domains}


def test_feasible_table_counts_fallback_updates_and_feasible_cells():
    table = _module().feasible_table(
        [
            _cell("dynamics", [0, 3, 0], 0.9),  # constraint held: feasible
            _cell("dynamics", [5, 0, 0], 1.1),  # constraint broken: infeasible
            _cell("fixed-uniform-w1", [0, 0, 0], 0.9),  # not DynaMiCS: not counted
        ]
    )
    assert "| dynamics | 4 of 6 | 1 of 2 | 1 of 2 |" in table
    assert "fixed" not in table


def _cell2(method, weights, constraints):
    """A cell with target t and the constraints {name: (base, end, change_se)}."""
    domains = {"t": {"role": "target", "reference": None, "metric": "loss", "test_of": None}}
    first, last = {"t": {"loss": 2.0}}, {"t": {"loss": 1.5}}
    for d, (base, end, se) in constraints.items():
        domains[d] = {"role": "constraint", "reference": None, "metric": "loss", "test_of": None}
        first[d], last[d] = {"loss": base}, {"loss": end, "change_se": se}
    return {
        "method": method,
        "recs": [],
        "evals": [(0, first), (32, last)],
        "domains": domains,
        "weights": {"name": "fixed", "weights": weights},
    }


def test_blocking_table_names_the_constraint_nothing_lowers():
    flat, low = (1.0, 1.01, 0.005), (4.0, 3.9, 0.01)  # held within noise (broken) / lowered
    table = _module().blocking_table(
        [
            _cell2("fixed-uniform-w0", {"t": 0.0, "replay": 1.0}, {"a": flat, "b": low}),
            _cell2("fixed-uniform-w0", {"t": 0.0, "replay": 1.0}, {"b": low}),
            # w = 0 mixing in a second non-target: not the regulariser alone
            _cell2("fixed-uniform-w0", {"t": 0.0, "x": 0.5, "replay": 0.5}, {"a": (1, 2, 0.1)}),
            _cell2("dynamics", {}, {"a": flat, "b": low}),
            _cell2("dynamics", {}, {"b": low}),
        ]
    )
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    # a: moved +0.010 by the regulariser alone (the mixed-in cell's +1 is left out)
    assert rows["a"].startswith("| a | +0.010 (0.005) | 0/1 / 1/1 | 0/2 / 1/1 |")
    assert rows["b"].startswith("| b | -0.100 (0.010) | 1/2 / 0/0 | 1/2 / 0/1 |")


def test_several_suite_dirs_read_as_one_with_shared_cells_once(tmp_path):
    import json

    import yaml

    def cell(root, key, loss):
        out = tmp_path / root / "cells" / key
        out.mkdir(parents=True)
        (out / "summary.json").write_text("{}")
        evals = [{"name": "t", "role": "target"}]
        (out / "cell.yaml").write_text(yaml.safe_dump({"evals": evals, "mixer": {}}))
        (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval": {"t": {"loss": loss}}}))

    cell("std", "s1--proportional--s0", 1.0)
    cell("std", "s1--dynamics--s0", 2.0)
    cell("ext", "s1--proportional--s0", 9.0)  # the same cell in the second suite
    cell("ext", "s1--exp3--s0", 3.0)
    cells = _module().read([tmp_path / "std", tmp_path / "ext"])
    got = {c["method"]: c["evals"][0][1]["t"]["loss"] for c in cells}
    assert got == {"proportional": 1.0, "dynamics": 2.0, "exp3": 3.0}
