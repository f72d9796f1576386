"""The suite file of ``mixtune bench SUITE.yaml``: scenarios, methods, seeds; validated on load.

A suite names one or more scenarios (training datasets, evaluation domains with roles, a step
budget), the methods to compare (a mixer config each, optionally a loss, or a planner) and the
seeds. Every (scenario, method, loss, seed) cell is an ordinary ``mixtune train`` run
(:mod:`~mixtune.suite.cell`, :mod:`~mixtune.suite.runner`).

``protocol: paper`` (the default; DynaMiCS paper §1.6): every built-in target and constraint
domain is evaluated on its ``dev`` split, with a ``role: test`` twin ``<name>-test`` on its
``test`` split (any domain with ``test_split: <split>`` gets one too); the table selects each
cell's checkpoint on dev and reports it on test (:mod:`~mixtune.suite.table`). ``protocol:
end``: the domains as written, no twins.

Method entries (``methods:``):

- ``{name: uniform, mixer: {name: uniform}}``: a mixer config, as in a run YAML;
- ``{name: target-only, mixer: {name: fixed, weights: targets}}``: ``weights: targets`` is
  resolved per scenario to equal shares of the training datasets named like a target domain;
- ``{name: prop-dft, mixer: {name: proportional}, loss: {name: dft}}``: the loss as a second
  axis (a row of its own); the suite-level ``losses: [dft, cadft]`` crosses every method with
  each loss instead;
- ``{name: mergemix, planner: {name: mergemix, experts: {steps: 8}, ...}}``: per scenario and
  seed, ``mixtune plan <planner>`` first, then the cell trains with the mixer the plan emits;
  the planning wall time is part of the cell's time and cost;
- ``{name: fixed-sweep, sweep: {masses: [0, 0.2, 0.5, 0.8, 1], schemes: [uniform,
  proportional]}}``: the paper's fixed-weight baselines, one ``fixed`` mixer per (scheme, mass):
  target mass w split equally (``uniform``) or by sample counts (``proportional``) over the
  datasets named like a target domain, 1 - w equally over the others
  (:mod:`~mixtune.suite.sweep`). Each is a row (``fixed-uniform-w0.5``: the name without
  ``-sweep``); members whose weights coincide in a scenario share one cell. The table adds the
  best single member and the per-scenario oracle.

References are strict by default: a constraint domain without an explicit ``reference`` keeps
the base model's value at the cell's step 0 (its own examples). ``reference_slack`` (optional,
nats) states a slack instead: the base model's loss, measured per scenario and seed on the
cell's own examples (:mod:`~mixtune.suite.references`), plus the slack, for the methods that
plan against references (DynaMiCS; a planner, which adds it to its own base measurement) and
for the feasibility columns alike. Columns: :mod:`~mixtune.suite.table` and docs/bench.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mixtune import rawconfig, schema
from mixtune.errors import ConfigError
from mixtune.registry import PLANNERS
from mixtune.suite.sweep import Sweep, SweepPoint

SUITES_DIR = Path(__file__).parent
"""Where the built-in suites (``quick.yaml``, ``standard.yaml``, ``extended.yaml``) live."""


@dataclass(frozen=True)
class Method:
    name: str
    """Label in the table (letters, digits, '_' or '-'; names the cell directories)."""
    mixer: dict = field(default_factory=lambda: {"name": "proportional"})
    loss: dict = field(default_factory=lambda: {"name": "sft"})
    planner: dict | None = None
    """``{name: <planner>, ...plan options}``: plan the mixture per scenario and seed, then
    train with the mixer the plan emits (``mixer`` is then ignored)."""
    sweep: dict | Sweep | None = None
    """A family of fixed mixers, one row each (``mixer`` is then ignored): a mapping in YAML, a
    :class:`Sweep` once built (built here, so that its errors name the method)."""
    point: SweepPoint | None = None
    """Set on the members a sweep expands into (:func:`methods_of`), not in YAML."""

    def __post_init__(self):
        if self.point is None:  # members are named by their mass, e.g. fixed-uniform-w0.5
            schema.check_name(self.name, "methods[].name")
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
        schema.check_name(self.name, "scenarios[].name")


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
        schema.unique([s.name for s in self.scenarios], "scenarios")
        schema.unique([m.name for m in methods_of(self)], "methods (sweeps expanded)")


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
    """A suite from a YAML path or a built-in name (``quick``, ``standard``, ``extended``)."""
    path = Path(path_or_name)
    if not path.is_file() and (SUITES_DIR / f"{path_or_name}.yaml").is_file():
        path = SUITES_DIR / f"{path_or_name}.yaml"
    raw = rawconfig.read_yaml(path)
    for item in overrides:
        rawconfig.apply_override(raw, item)
    return schema.build(Suite, raw, "suite")
