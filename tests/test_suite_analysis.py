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
