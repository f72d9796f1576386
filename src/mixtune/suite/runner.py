"""``mixtune bench SUITE.yaml``: methods side by side on the same scenarios, one table.

A suite names one or more scenarios (training datasets, evaluation domains with roles, a step
budget), the methods to compare (a mixer config each, optionally a loss, or a planner) and the
seeds. Every (scenario, method, loss, seed) cell is an ordinary ``mixtune train`` run in its own
process under ``<output_dir>/cells/``; a cell with ``summary.json`` is finished and never rerun, so
an interrupted suite resumes. A cell that fails records its error (``error.txt``) and the rest
finish. Cells run in parallel processes (``parallel``), each with ``threads`` torch threads.

``protocol: paper`` (the default; DynaMiCS paper §1.6): every built-in target and constraint
domain is evaluated on its ``dev`` split, with a ``role: test`` twin ``<name>-test`` on its
``test`` split (any domain with ``test_split: <split>`` gets one too); the table selects each
cell's checkpoint on dev and reports it on test (suite_table.py). ``protocol: end``: the
domains as written, no twins.

Method entries (``methods:``):

- ``{name: uniform, mixer: {name: uniform}}``: a mixer config, as in a run YAML;
- ``{name: target-only, mixer: {name: fixed, weights: targets}}``: ``weights: targets`` is
  resolved per scenario to equal shares of the training datasets named like a target domain;
- ``{name: prop-dft, mixer: {name: proportional}, loss: {name: dft}}``: the loss as a second
  axis (a row of its own); the suite-level ``losses: [dft, cadft]`` crosses every method with
  each loss instead;
- ``{name: mergemix, planner: {name: mergemix, experts: {steps: 8}, ...}}``: per scenario and
  seed, ``mixtune plan mergemix`` first (suite_cell.py), then the cell trains with the planned
  weights as a ``fixed`` mixer; the planning wall time is part of the cell's time and cost;
- ``{name: fixed-sweep, sweep: {masses: [0, 0.2, 0.5, 0.8, 1], schemes: [uniform,
  proportional]}}``: the paper's fixed-weight baselines, one ``fixed`` mixer per (scheme, mass):
  target mass w split equally (``uniform``) or by sample counts (``proportional``) over the
  datasets named like a target domain, 1 - w equally over the others (suite_sweep.py). Each is a row
  (``fixed-uniform-w0.5``: the name without ``-sweep``); members whose weights coincide in a
  scenario share one cell. The table adds the best single member and the per-scenario oracle.

References are strict by default: a constraint domain without an explicit ``reference`` keeps
the base model's value at the cell's step 0 (its own examples). ``reference_slack`` (optional,
nats) states a slack instead: the base model's loss, measured per scenario and seed on the
cell's own examples (cached in ``references.json``), plus the slack, for the methods that plan
against references (DynaMiCS, MergeMix, which adds it to its own base measurement) and for the
feasibility columns alike. Columns: see suite_table.py and docs/bench.md.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mixtune import schema
from mixtune.errors import ConfigError
from mixtune.registry import PLANNERS
from mixtune.suite.sweep import Sweep, SweepPoint, sweep_weights
from mixtune.suite.table import aggregate, cell_result, markdown_table, write_tables

__all__ = [
    "Method",
    "Scenario",
    "Suite",
    "Sweep",
    "SweepPoint",
    "Cell",
    "load_suite",
    "methods_of",
    "cells",
    "sweep_weights",
    "run_suite",
    "check_suite",
    "aggregate",
    "cell_result",
    "markdown_table",
    "write_tables",
]

SUITES_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Method:
    name: str
    """Label in the table (letters, digits, '_' or '-'; names the cell directories)."""
    mixer: dict = field(default_factory=lambda: {"name": "proportional"})
    loss: dict = field(default_factory=lambda: {"name": "sft"})
    planner: dict | None = None
    """``{name: mergemix, ...plan options}``: plan the mixture per scenario and seed, then
    train with it as a ``fixed`` mixer (``mixer`` is then ignored)."""
    sweep: dict | Sweep | None = None
    """A family of fixed mixers, one row each (``mixer`` is then ignored): a mapping in YAML, a
    :class:`Sweep` once built (built here, so that its errors name the method)."""
    point: SweepPoint | None = None
    """Set on the members a sweep expands into (:func:`methods_of`), not in YAML."""

    def __post_init__(self):
        if self.point is None:  # members are named by their mass, e.g. fixed-uniform-w0.5
            schema._check_name(self.name, "methods[].name")
        if self.planner is not None and self.planner.get("name") not in PLANNERS:
            raise ConfigError(
                f"methods.{self.name}.planner.name: allowed values are "
                f"{list(PLANNERS)}, got {self.planner.get('name')!r}"
            )
        if self.sweep is not None and self.planner is not None:
            raise ConfigError(f"methods.{self.name}: a sweep and a planner exclude each other")
        if isinstance(self.sweep, dict):
            object.__setattr__(
                self, "sweep", schema.build(Sweep, self.sweep, f"methods.{self.name}.sweep")
            )


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
    """A stated slack (nats): constraint references = the base model's loss on the cell's own
    examples + this. Null (the default): strict, the base model's value at step 0."""
    protocol: Literal["paper", "end"] = "paper"
    """``paper``: built-in targets and constraints on dev with test twins (select on dev, report
    on test); ``end``: the evaluation domains as written."""

    def __post_init__(self):
        if not self.scenarios or not self.methods:
            raise ConfigError("suite: needs at least one scenario and one method")
        if self.parallel < 1 or self.threads < 1:
            raise ConfigError("suite: parallel and threads must be >= 1")
        if self.reference_slack is not None and self.reference_slack < 0:
            raise ConfigError(f"reference_slack: must be >= 0, got {self.reference_slack}")
        schema._unique([s.name for s in self.scenarios], "scenarios")
        schema._unique([m.name for m in methods_of(self)], "methods (sweeps expanded)")


def methods_of(suite: Suite) -> list[Method]:
    """The suite's methods with every sweep expanded into its members, in order."""
    out = []
    for m in suite.methods:
        if m.sweep is None:
            out.append(m)
            continue
        prefix = m.name.removesuffix("-sweep")
        out += [
            Method(
                f"{prefix}-{scheme}-w{mass:g}",
                {"name": "fixed"},
                m.loss,
                point=SweepPoint(m.name, scheme, mass),
            )
            for scheme in m.sweep.schemes
            for mass in m.sweep.masses
        ]
    return out


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


def run_suite(suite: Suite, progress: bool = True) -> list[dict]:
    """Run every unfinished cell, then write the tables; returns the aggregated rows."""
    from mixtune.suite import cell as suite_cell

    root = Path(suite.output_dir)
    (root / "cells").mkdir(parents=True, exist_ok=True)
    runs = [c for c in cells(suite) if c.alias_of is None]
    todo = [c for c in runs if not (root / "cells" / c.key / "summary.json").is_file()]
    total = len(runs)
    print(
        f"suite: {total} cells, {total - len(todo)} already done, running {len(todo)} "
        f"({suite.parallel} at a time, {suite.threads} threads each)",
        flush=True,
    )
    refs = suite_cell.references(suite, {(c.scenario.name, c.seed): c for c in todo}.values())
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
    mixer's dataset names (sweep members included) are checked against the scenario. Returns
    the number of cells that would run (sweep members with coinciding weights count once).
    """
    from mixtune import config as config_mod
    from mixtune.planners.mergemix import planner as mergemix
    from mixtune.suite import cell as suite_cell

    runs = [c for c in cells(suite) if c.alias_of is None]
    fake = {
        s.name: {
            seed: {e["name"]: 0.0 for e in suite_cell.scenario_evals(suite, s)}
            for seed in suite.seeds
        }
        for s in suite.scenarios
    }
    for c in runs:
        where = f"cell {c.key}"
        try:
            raw = suite_cell.cell_raw(
                suite,
                c,
                Path(suite.output_dir) / "cells" / c.key,
                fake if suite.reference_slack is not None else None,
            )
            run = config_mod.load(data=raw, overrides=c.scenario.overrides)
            if c.method.planner is not None:
                mergemix.load(None, data=suite_cell.plan_raw(suite, c, raw, Path("plan")))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        weights = run.mixer.params.get("weights") if run.mixer.name == "fixed" else None
        names = [d.name for d in run.datasets]
        for k in weights or {}:
            if k not in names:
                raise ConfigError(
                    f"{where}: mixer.weights.{k}: unknown dataset name; datasets are {names}"
                )
    return len(runs)
