"""``mixtune bench SUITE.yaml``: methods side by side on the same scenarios, one table.

A suite names one or more scenarios (training datasets, evaluation domains with roles, a step
budget), the methods to compare (a mixer config each, optionally a loss, or a planner) and the
seeds. Every (scenario, method, loss, seed) cell is an ordinary ``mixtune train`` run in its own
process under ``<output_dir>/cells/``; a cell with ``summary.json`` is finished and never rerun, so
an interrupted suite resumes. A cell that fails records its error (``error.txt``) and the rest
finish. Cells run in parallel processes (``parallel``), each with ``threads`` torch threads.

Method entries (``methods:``):

- ``{name: uniform, mixer: {name: uniform}}``: a mixer config, as in a run YAML;
- ``{name: target-only, mixer: {name: fixed, weights: targets}}``: ``weights: targets`` is
  resolved per scenario to equal shares of the training datasets named like a target domain;
- ``{name: prop-dft, mixer: {name: proportional}, loss: {name: dft}}``: the loss as a second
  axis (a row of its own); the suite-level ``losses: [dft, cadft]`` crosses every method with
  each loss instead;
- ``{name: mergemix, planner: {name: mergemix, experts: {steps: 8}, ...}}``: per scenario and
  seed, ``mixtune plan mergemix`` first (suite_cell.py), then the cell trains with the planned
  weights as a ``fixed`` mixer; the planning wall time is part of the cell's time and cost.

``reference_slack`` (optional, nats): every constraint domain without an explicit ``reference``
gets the base model's loss on it plus this slack as its reference (measured once per scenario,
cached in ``references.json``), for the methods that plan against references (DynaMiCS,
MergeMix) and for the feasibility column alike. Columns: see suite_table.py and docs/bench.md.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mixtune import schema
from mixtune.errors import ConfigError
from mixtune.suite_table import aggregate, cell_result, markdown_table, write_tables

__all__ = ["Method", "Scenario", "Suite", "Cell", "load_suite", "cells", "run_suite",
           "check_suite", "aggregate", "cell_result", "markdown_table", "write_tables"]

SUITES_DIR = Path(__file__).parent / "suites"
PLANNERS = ("mergemix",)


@dataclass(frozen=True)
class Method:
    name: str
    """Label in the table (letters, digits, '_' or '-'; names the cell directories)."""
    mixer: dict = field(default_factory=lambda: {"name": "proportional"})
    loss: dict = field(default_factory=lambda: {"name": "sft"})
    planner: dict | None = None
    """``{name: mergemix, ...plan options}``: plan the mixture per scenario and seed, then
    train with it as a ``fixed`` mixer (``mixer`` is then ignored)."""

    def __post_init__(self):
        schema._check_name(self.name, "methods[].name")
        if self.planner is not None and self.planner.get("name") not in PLANNERS:
            raise ConfigError(f"methods.{self.name}.planner.name: allowed values are "
                              f"{list(PLANNERS)}, got {self.planner.get('name')!r}")


@dataclass(frozen=True)
class Scenario:
    name: str
    datasets: tuple[dict, ...]
    evals: tuple[dict, ...]
    overrides: tuple[str, ...] = ()
    """Extra ``key=value`` overrides for this scenario's cells."""

    def __post_init__(self):
        schema._check_name(self.name, "scenarios[].name")


@dataclass(frozen=True)
class Suite:
    output_dir: str = "runs/bench"
    base: dict = field(default_factory=dict)
    """Run-config keys shared by every cell (model, train, max_steps, ...)."""
    scenarios: tuple[Scenario, ...] = ()
    methods: tuple[Method, ...] = ()
    losses: tuple[str, ...] = ()
    """Optional second axis: every method is also run with each of these losses."""
    seeds: tuple[int, ...] = (0,)
    baseline: str = "proportional"
    """Method whose median wall time is cost 1.0."""
    parallel: int = 1
    threads: int = 2
    reference_slack: float | None = None
    """Constraint references = base model's loss + this (nats); null = the loop's default."""

    def __post_init__(self):
        if not self.scenarios or not self.methods:
            raise ConfigError("suite: needs at least one scenario and one method")
        if self.parallel < 1 or self.threads < 1:
            raise ConfigError("suite: parallel and threads must be >= 1")
        if self.reference_slack is not None and self.reference_slack < 0:
            raise ConfigError(f"reference_slack: must be >= 0, got {self.reference_slack}")
        schema._unique([s.name for s in self.scenarios], "scenarios")
        schema._unique([m.name for m in self.methods], "methods")


def load_suite(path_or_name: str, overrides: list[str] | tuple[str, ...] = ()) -> Suite:
    """A suite from a YAML path or a built-in name (``quick``, ``standard``)."""
    path = Path(path_or_name)
    if not path.is_file() and (SUITES_DIR / f"{path_or_name}.yaml").is_file():
        path = SUITES_DIR / f"{path_or_name}.yaml"
    raw = schema.read_yaml(path)
    for item in overrides:
        schema.apply_override(raw, item)
    return schema.build(Suite, raw, "suite")


@dataclass
class Cell:
    scenario: Scenario
    method: Method
    loss: str | None
    seed: int

    @property
    def key(self) -> str:
        loss = f"-{self.loss}" if self.loss else ""
        return f"{self.scenario.name}--{self.method.name}{loss}--s{self.seed}"

    @property
    def label(self) -> str:
        return self.method.name + (f" + {self.loss}" if self.loss else "")


def cells(suite: Suite) -> list[Cell]:
    losses = suite.losses or (None,)
    return [Cell(sc, m, loss, seed) for sc in suite.scenarios for m in suite.methods
            for loss in losses for seed in suite.seeds]


def run_suite(suite: Suite, progress: bool = True) -> list[dict]:
    """Run every unfinished cell, then write the tables; returns the aggregated rows."""
    from mixtune import suite_cell

    root = Path(suite.output_dir)
    (root / "cells").mkdir(parents=True, exist_ok=True)
    todo = [c for c in cells(suite) if not (root / "cells" / c.key / "summary.json").is_file()]
    total = len(cells(suite))
    print(f"suite: {total} cells, {total - len(todo)} already done, running {len(todo)} "
          f"({suite.parallel} at a time, {suite.threads} threads each)", flush=True)
    refs = suite_cell.references(suite, {c.scenario.name: c.scenario for c in todo}.values())
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not progress)

    def one(cell: Cell) -> None:
        suite_cell.run_cell(suite, cell, root / "cells" / cell.key, refs)
        bar.update(1)

    with ThreadPoolExecutor(max_workers=suite.parallel) as pool:
        list(pool.map(one, todo))
    bar.close()
    rows = aggregate(suite, cells(suite))
    write_tables(suite, rows)
    return rows


def check_suite(suite: Suite) -> int:
    """Validate every cell's run config (and plan config) without running anything.

    Constraint references (``reference_slack``) are filled with a placeholder; a ``fixed``
    mixer's dataset names are checked against the scenario. Returns the number of cells.
    """
    from mixtune import config as config_mod
    from mixtune import suite_cell
    from mixtune.planners import mergemix

    all_cells = cells(suite)
    fake = {s.name: {e["name"]: 0.0 for e in s.evals} for s in suite.scenarios}
    for c in all_cells:
        raw = suite_cell.cell_raw(suite, c, Path(suite.output_dir) / "cells" / c.key,
                                  fake if suite.reference_slack is not None else None)
        where = f"cell {c.key}"
        try:
            run = config_mod.load(data=raw, overrides=c.scenario.overrides)
            if c.method.planner is not None:
                mergemix.load(None, data=suite_cell.plan_raw(c, raw, Path("plan")))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        weights = run.mixer.params.get("weights") if run.mixer.name == "fixed" else None
        names = [d.name for d in run.datasets]
        for k in (weights or {}):
            if k not in names:
                raise ConfigError(f"{where}: mixer.weights.{k}: unknown dataset name; "
                                  f"datasets are {names}")
    return len(all_cells)
