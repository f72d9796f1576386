"""One cell of a suite: a (scenario, method, loss, seed), and the configs it runs.

- :class:`Cell`, :func:`cells`: the suite's cells, sweep members with coinciding weights
  aliased to one run;
- :func:`scenario_evals`: a scenario's evaluation domains under the suite's ``protocol``
  (``paper``: built-in targets and constraints on their dev split, each with a test twin);
- :func:`cell_raw`: the cell's run config (suite ``base`` + scenario datasets/evals + the
  method's mixer and loss + seed), with ``weights: targets``, sweep weights and constraint
  references resolved;
- :func:`plan_config`: for a planner method, the plan config its planner builds for the cell
  (the planner's ``suite_plan``).

Running cells (in processes, planning first): :mod:`~mixtune.suite.runner`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mixtune import rawconfig
from mixtune.errors import ConfigError
from mixtune.registry import PLANNERS
from mixtune.suite.config import Method, Scenario, Suite, methods_of
from mixtune.suite.sweep import sweep_weights


@dataclass
class Cell:
    scenario: Scenario
    method: Method
    loss: str | None
    seed: int
    alias_of: str | None = None
    """A sweep member whose weights coincide with an earlier member's in this scenario: the key
    of that member's cell, whose run (and numbers) this one shares."""

    @property
    def key(self) -> str:
        loss = f"-{self.loss}" if self.loss else ""
        return f"{self.scenario.name}--{self.method.name}{loss}--s{self.seed}"

    @property
    def run_key(self) -> str:
        """The directory under ``cells/`` holding this cell's run."""
        return self.alias_of or self.key

    @property
    def label(self) -> str:
        return self.method.name + (f" + {self.loss}" if self.loss else "")

    @property
    def family(self) -> str | None:
        """The row label of the sweep this cell belongs to (None outside sweeps)."""
        point = self.method.point
        return None if point is None else point.family + (f" + {self.loss}" if self.loss else "")


def cells(suite: Suite) -> list[Cell]:
    """Every cell of the suite, sweeps expanded; coinciding sweep members are aliased."""
    losses = suite.losses or (None,)
    out = [
        Cell(sc, m, loss, seed)
        for sc in suite.scenarios
        for m in methods_of(suite)
        for loss in losses
        for seed in suite.seeds
    ]
    first: dict[tuple, str] = {}
    for c in out:
        if c.method.point is None:
            continue
        try:
            w = sweep_weights(c.scenario, c.method.point)
        except ConfigError:  # reported by the cell itself (error.txt) or by --check
            continue
        same = (c.scenario.name, c.family, c.seed, tuple(sorted(w.items())))
        c.alias_of = first.setdefault(same, c.key)
        if c.alias_of == c.key:
            c.alias_of = None
    return out


def plain(x):
    """A deep copy of ``x`` in plain JSON types (tuples become lists), ready for YAML."""
    return json.loads(json.dumps(x))


def scenario_evals(suite: Suite, sc: Scenario) -> list[dict]:
    """The evaluation domains of scenario ``sc`` as its cells run them (references unfilled).

    ``protocol: paper``: a built-in target or constraint domain read from its ``eval`` split
    is read from the ``dev`` half instead and gets a twin ``{name}-test`` (``role: test``,
    ``test_of: name``) on the ``test`` half, with the same batches; a domain with ``test_split:
    S`` gets a twin on split ``S``. Selection sees dev, the report reads test (suite/table.py).
    """
    evals, twins = [], []
    for e in plain(list(sc.evals)):
        test_split = e.pop("test_split", None)
        evals.append(e)
        if suite.protocol != "paper":
            continue
        builtin = (
            str(e.get("path", "")).startswith("builtin:")
            and e.get("from_dataset") is None
            and e.get("role") in ("target", "constraint")
        )
        if builtin and e.get("split", "train") == "eval":
            e["split"] = "dev"  # test is the other half of eval: keep them apart
            test_split = test_split or "test"
        if test_split is not None:
            twin = {k: v for k, v in e.items() if k != "reference"}
            twins.append(
                {
                    **twin,
                    "name": f"{e['name']}-test",
                    "split": test_split,
                    "role": "test",
                    "test_of": e["name"],
                }
            )
    return evals + twins


def cell_raw(suite: Suite, cell: Cell, out: Path, refs: dict | None) -> dict:
    """The raw run config of ``cell`` (before the scenario's ``key=value`` overrides).

    ``refs``: ``{scenario: {seed: {domain: base loss}}}`` under ``reference_slack`` (see
    :mod:`~mixtune.suite.references`), else None. A planner method's mixer is a placeholder
    (``uniform``) until its plan is done.
    """
    sc, m = cell.scenario, cell.method
    raw = plain(suite.base)
    evals = scenario_evals(suite, sc)
    if refs is not None:
        for e in evals:
            if (
                e.get("role") == "constraint"
                and e.get("reference") is None
                and e.get("metric", "loss") == "loss"
            ):
                base = refs[sc.name][cell.seed][e["name"]]
                e["reference"] = round(base + suite.reference_slack, 6)
    mixer = plain(m.mixer)
    if m.point is not None:
        mixer = {"name": "fixed", "weights": sweep_weights(sc, m.point)}
    if mixer.get("weights") == "targets":
        targets = {e["name"] for e in sc.evals if e.get("role") == "target"}
        names = [d["name"] for d in sc.datasets if d["name"] in targets]
        if not names:
            raise ConfigError(
                f"methods.{m.name}.mixer.weights: 'targets' needs a training "
                f"dataset named like a target domain in scenario {sc.name}"
            )
        mixer["weights"] = {n: 1.0 for n in names}
    if m.planner is not None:
        mixer = {"name": "uniform"}  # replaced by the mixer the plan emits (runner.run_cell)
    raw.update(
        output_dir=str(out),
        seed=cell.seed,
        progress=False,
        datasets=plain(list(sc.datasets)),
        evals=evals,
        mixer=mixer,
        loss={"name": cell.loss} if cell.loss else plain(m.loss),
    )
    return raw


def plan_config(suite: Suite, cell: Cell, run_raw: dict, plan_dir: Path) -> dict:
    """The plan config of a planner cell: its planner's ``suite_plan`` of the cell's run.

    The planner plans the run as the cell trains it (the scenario's overrides applied), less
    the suite's constraint references and the test twins: plans never see test data, and a
    planner bounds the constraints by the base model as *it* measures them (on its own
    evaluation batches), plus the suite's ``reference_slack`` when one is stated.
    """
    run = plain(run_raw)
    run["evals"] = [e for e in scenario_evals(suite, cell.scenario) if e.get("role") != "test"]
    for item in cell.scenario.overrides:
        rawconfig.apply_override(run, item)
    options = {k: v for k, v in plain(cell.method.planner).items() if k != "name"}
    planner = PLANNERS[cell.method.planner["name"]]
    return planner.suite_plan(options, run, str(plan_dir), suite.reference_slack)
