"""MergeMix plan configuration: the plan YAML's dataclasses, loading, objective and bounds.

A plan file holds the mixture run being planned (``run``: a train config, inline or a path) and
the planner's own sections; ``load`` applies ``key=value`` overrides (``run.*`` included) and
validates everything, raising :class:`ConfigError` naming the field. The method:
:mod:`mixtune.planners.mergemix`; every option: docs/mergemix.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mixtune import config as config_mod
from mixtune import rawconfig, schema
from mixtune.config import RunConfig
from mixtune.errors import ConfigError
from mixtune.planners.mergemix import search


@dataclass(frozen=True)
class ExpertsConfig:
    steps: int | None = None
    """Optimizer steps per expert (default: run.max_steps // 4); or give ``tokens``."""
    tokens: int | None = None
    """Supervised tokens per expert (converted to steps per dataset)."""
    lr: float | None = None
    """Constant learning rate of the experts (default: run.train.lr)."""
    save_every: int | None = None
    """Checkpoint interval of an expert, for resuming (default: a quarter of its steps)."""

    def __post_init__(self):
        if self.steps is not None and self.tokens is not None:
            raise ConfigError("experts: give steps or tokens, not both")
        for key in ("steps", "tokens", "save_every"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"experts.{key}: must be >= 1, got {v}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"experts.lr: must be > 0, got {self.lr}")


@dataclass(frozen=True)
class ObjectiveConfig:
    metric: Literal["loss", "accuracy"] = "loss"
    """Minimise the weighted loss, or maximise the weighted accuracy."""
    weights: dict | None = None
    """Per-domain weights (default: the target domains equally; all domains if none)."""
    normalize: Literal["spread", "base", "none"] = "spread"
    """``spread``: each domain's metric as a z-score over the seed merges (centred, divided by
    its standard deviation there), so each domain's share of the objective's spread is its
    weight and no domain dominates unless weighted to; ``base``: divided by the base model's
    value (a weighted mean of ratios to the base; 1 = base), which lets a domain with a small
    base value dominate; ``none``: the raw weighted metric."""


@dataclass(frozen=True)
class SearchConfig:
    n_seeds: int | None = None
    """Seed merges evaluated before the first fit (default max(20, 5K))."""
    surrogate: Literal["gbt", "lightgbm", "gp", "quadratic"] = "gbt"
    n_candidates: int = 100_000
    """Dirichlet(1) candidates scored on the surrogates."""
    refit_rounds: int = 0
    """Rounds of: evaluate the top-k candidates as real merges, refit, search again."""
    top_k: int = 5
    eval_batches: int | None = None
    """Evaluation batches per domain and merge (default: every fixed batch of the domain)."""
    seed: int | None = None
    """Seed of the simplex sampling (default: the run's seed)."""
    select: Literal["measured", "surrogate"] = "measured"
    """α*: the best merge actually evaluated, on measured scores within the bounds (the
    surrogate proposes its trust-region optimum, which is measured too), or ``surrogate``: the
    surrogate's optimum (the paper's rule, faithful; unmeasured, may extrapolate)."""
    trust_radius: float | None = None
    """Surrogate candidates only within this Euclidean distance of a measured merge (default:
    the median nearest-neighbour distance of the measured merges with ``select: measured``,
    the whole simplex with ``select: surrogate``)."""

    def __post_init__(self):
        if self.trust_radius is not None and not self.trust_radius > 0:
            raise ConfigError(f"search.trust_radius: must be > 0, got {self.trust_radius}")
        if self.n_seeds is not None and self.n_seeds < 3:
            raise ConfigError(f"search.n_seeds: must be >= 3, got {self.n_seeds}")
        for key in ("n_candidates", "top_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"search.{key}: must be >= 1, got {getattr(self, key)}")
        if self.refit_rounds < 0:
            raise ConfigError(f"search.refit_rounds: must be >= 0, got {self.refit_rounds}")


@dataclass(frozen=True)
class ValidateConfig:
    n_mixtures: int = 8
    """Mixtures trained for real, in all: MergeMix's, uniform, proportional, the explicit
    ``mixtures``, then Dirichlet(1) draws up to this count."""
    mixtures: tuple[dict, ...] = ()
    """Explicit merge weights to validate: ``{dataset: weight}`` or
    ``{label: name, weights: {dataset: weight}}``."""
    steps: int | None = None
    """Steps of each real mixture run (default: run.max_steps)."""
    scales: dict | None = None
    """Other model scales for transfer: ``{name: [override, ...]}`` applied to the real runs,
    e.g. ``{large: ["model.config.num_hidden_layers=4"]}``."""

    def __post_init__(self):
        if self.n_mixtures < 3:
            raise ConfigError(f"validate.n_mixtures: must be >= 3, got {self.n_mixtures}")


@dataclass(frozen=True)
class PlanConfig:
    run: str | dict
    """The mixture run to plan: a train YAML (path relative to the plan file) or a mapping."""
    output_dir: str = "runs/mergemix"
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    constraints: dict | None = None
    """Extra bounds: ``{domain: {max: v} | {min: v} | reference}`` (metric: the domain's)."""
    constraint_roles: bool = True
    """Keep every ``constraint``-role domain at its reference (null = base model's value)."""
    constraint_slack: float = 0.0
    """Relative tolerance on every bound."""
    reference_slack: float = 0.0
    """Nats added to a loss bound at the base model's value (a null reference), as measured by
    the planner on its own evaluation batches (``mixtune bench``'s ``reference_slack``)."""
    search: SearchConfig = field(default_factory=SearchConfig)
    ratio_rule: Literal["identity", "token_weighted"] = "identity"
    ratio_units: Literal["examples", "tokens"] = "examples"
    grid_resolution: int = 4
    """Cost comparison: the grid of full runs with shares in multiples of 1/resolution."""
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    progress: bool = True

    def __post_init__(self):
        if self.grid_resolution < 1:
            raise ConfigError(f"grid_resolution: must be >= 1, got {self.grid_resolution}")
        if self.constraint_slack < 0:
            raise ConfigError(f"constraint_slack: must be >= 0, got {self.constraint_slack}")
        if self.reference_slack < 0:
            raise ConfigError(f"reference_slack: must be >= 0, got {self.reference_slack}")


def load(
    path: str | Path | None, overrides=(), data: dict | None = None
) -> tuple[PlanConfig, RunConfig]:
    """Read a plan YAML (or ``data``) + ``key=value`` overrides; returns (plan, run config)."""
    raw = rawconfig.read_yaml(path) if data is None else copy.deepcopy(data)
    if isinstance(raw.get("run"), str):  # inline the run YAML so run.* overrides apply
        p = Path(raw["run"])
        if not p.is_absolute() and path is not None and not p.is_file():
            p = Path(path).parent / p
        raw["run"] = rawconfig.read_yaml(p)
    for item in overrides:
        rawconfig.apply_override(raw, item)
    if "run" not in raw:
        raise ConfigError("run: required; a train YAML path or an inline run config")
    pc = schema.build(PlanConfig, raw, "")
    run = config_mod.from_dict(pc.run)
    if not run.evals:
        raise ConfigError("run.evals: MergeMix needs at least one evaluation domain")
    if len(run.datasets) < 2:
        raise ConfigError("run.datasets: MergeMix mixes at least two training datasets")
    names = [e.name for e in run.evals]
    for d in pc.objective.weights or {}:
        if d not in names:
            raise ConfigError(f"objective.weights.{d}: unknown domain; domains are {names}")
    for d in pc.constraints or {}:
        if d not in names:
            raise ConfigError(f"constraints.{d}: unknown domain; domains are {names}")
    return pc, run


def objective_of(pc: PlanConfig, run: RunConfig, base: dict | None = None) -> search.Objective:
    """The weighted objective; with ``normalize: base`` pass the base model's ``base`` scores.
    With ``normalize: spread`` the objective is marked for normalisation on the seed merges
    (:func:`mixtune.planners.mergemix.search.by_spread`, applied by the search)."""
    w = pc.objective.weights
    if w is None:
        targets = [e.name for e in run.evals if e.role == "target"]
        w = {n: 1.0 for n in (targets or [e.name for e in run.evals])}
    if any(not isinstance(v, (int, float)) or v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise ConfigError(f"objective.weights: non-negative numbers, not all 0, got {w}")
    total, metric = float(sum(w.values())), pc.objective.metric
    w = {d: v / total for d, v in w.items() if v > 0}
    if pc.objective.normalize == "base" and base is not None:
        for d in w:
            if not abs(base[d][metric]) > 1e-12:
                raise ConfigError(
                    f"objective.normalize: the base model's {metric} on {d} is 0; "
                    "use normalize: none"
                )
            w[d] /= abs(base[d][metric])
    return search.Objective(w, metric, spread=pc.objective.normalize == "spread")


def bound_specs(pc: PlanConfig, run: RunConfig) -> list[tuple[str, str, dict]]:
    """Validated ``(domain, metric, {max|min: value or None})`` for every bounded domain."""
    evals = {e.name: e for e in run.evals}
    spec = (
        {e.name: "reference" for e in run.evals if e.role == "constraint"}
        if pc.constraint_roles
        else {}
    )
    spec.update(pc.constraints or {})
    out = []
    for d, s in spec.items():
        where = f"constraints.{d}"
        if s == "reference":
            s = {}
        if not isinstance(s, dict) or not set(s) <= {"metric", "max", "min"}:
            raise ConfigError(f"{where}: expected 'reference' or a mapping of metric/max/min")
        metric = s.get("metric", evals[d].metric)
        if metric not in ("loss", "accuracy"):
            raise ConfigError(f"{where}.metric: allowed values are ['loss', 'accuracy']")
        limits = {k: s[k] for k in ("max", "min") if k in s}
        for k, v in limits.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{where}.{k}: expected a number, got {v!r}")
        # no explicit limit: the reference (null = the base model's value, known later)
        out.append((d, metric, limits or {"max" if metric == "loss" else "min": None}))
    return out


def bounds_of(pc: PlanConfig, run: RunConfig, base: dict) -> list[search.Bound]:
    """The search bounds, references resolved with the base model's scores ``base``."""
    evals = {e.name: e for e in run.evals}
    out = []
    for d, metric, limits in bound_specs(pc, run):
        for kind, v in limits.items():
            if v is None and evals[d].reference is not None:
                v = evals[d].reference
            elif v is None:  # the base model's value, + the stated slack on a loss
                v = base[d][metric] + (pc.reference_slack if metric == "loss" else 0.0)
            slack = pc.constraint_slack * abs(v)
            out.append(
                search.Bound(
                    d, metric, v + slack if kind == "max" else v - slack, upper=kind == "max"
                )
            )
    return out
