"""DynaMiCS: constrained dynamic mixtures from probing slope matrices.

Gualdoni, Laguna, Béthune, Monteiro, Ablin, Cuturi, "DynaMiCS: fine-tuning LLMs with performance
constraints using dynamic mixtures", arXiv 2605.10770 (2026).

Evaluation domains are targets T (improve), constraints C (stay at or under a reference: the base
model's value at step 0, or a given number) or monitors (logged only). At each scheduled update
t, with H_t the gap to the next update (or to the end):

1. anchors L_i(θ_t) for every domain (reusing the scheduled evaluation of this step);
2. for each dataset j: from a snapshot of parameters, optimizer, RNG and sampler, train
   c_t = min(H_t, c_max) steps on D_j alone with the run's optimizer and LR, evaluate every
   domain on the probe budget, restore. S_ij = (L_i after − L_i now) / c_t (:mod:`.slopes`);
3. for each (λ, ε) of the grid (15 log-spaced λ in [1, 5000], ε ∈ {0, .05, .1}) minimise
   Σ_{i∈T} S_i·w + λ Σ_{i∈C} max(0, L_i + H_t·S_i·w − L_i^ref + ε)² over the simplex; keep
   the feasible solution (every L_i + H_t·S_i·w <= L_i^ref) with the lowest target term, else
   the one with the smallest maximum predicted violation (:mod:`.solver`);
4. hold w* until the next update (the update steps and H_t: :mod:`.schedule`).
After training, the run summary names the best feasible evaluated step (``eval.constraints``).
Accuracy domains enter as −accuracy, so "accuracy >= reference" is "−accuracy <= −reference".

``slopes: gradient_alignment`` is the paper's App. L baseline: S_ij = −η⟨g_i, d_j⟩ with g_i the
mean gradient of domain i's evaluation loss and d_j the Adam direction (bias-corrected
m̂/(√v̂ + eps)) a step on a batch of D_j would take from the current moments. Its directions are
right but its scale is not, which is why probing is the default.

Deliberate simplifications and guesses:
1. Schedules are the paper's (2048-step) update sets scaled to ``max_steps`` and de-duplicated;
   ``c_max`` is not scaled (set it yourself, e.g. 128·max_steps/2048, to keep the paper's cost).
2. Feasibility of a candidate is judged on the predicted L̂ without ε (unspecified in the paper).
3. The solver is exact (active set + interior point, checked against a brute-force grid) rather
   than an unspecified "low-dimensional simplex optimisation". ``fallback: minimax`` (off by
   default) adds the exact least-max-violation mixture as a candidate when nothing is feasible.
4. Anchors recycled from a scheduled evaluation are computed on the probe budget's batches
   (the first ``probe_batches``), the examples every probe evaluates: the paper's anchors use
   all 200 batches and its probes 50, which biases S by (L_subset − L_all)/c_t.
5. Noise (beyond the paper): every slope's standard error, paired over the probe's examples,
   is logged (``S_se``, ``anchor_se``); a constraint that noise rather than the mixture would
   decide is named once in a warning; ``noise_margin: k`` solves with S + k·SE on the
   constraints (off by default).
6. Gradient alignment: the dataset gradient is unclipped, weight decay is left out of d_j, and
   accuracy domains are not supported (their metric has no gradient); it needs an unsharded
   model (single process or DDP, not FSDP).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mixtune.errors import ConfigError
from mixtune.eval.constraints import Constraints
from mixtune.mixers.base import DatasetInfo, DomainInfo, MixContext, Steps, Weights
from mixtune.mixers.dynamics import solver
from mixtune.mixers.dynamics.schedule import horizon, schedule_steps
from mixtune.mixers.dynamics.slopes import (
    from_gradient_alignment,
    from_probes,
    noise_notes,
    value,
    value_se,
)
from mixtune.schema import check

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DynaMiCSConfig:
    slopes: Literal["probe", "gradient_alignment"] = "probe"
    """How the slope matrix is measured: probing runs (the method) or gradient alignment."""
    schedule: Literal["no_warmup", "light_warmup", "dense_warmup", "fixed"] = "no_warmup"
    """Update steps: the paper's geometric sets scaled to max_steps, or every ``interval``."""
    interval: int = 128
    """Update interval for ``schedule: fixed``."""
    c_max: int = 128
    """Longest probe: c_t = min(H_t, c_max) steps per dataset."""
    probe_batches: int = 50
    """Evaluation batches per domain in a probe (capped by what each domain has)."""
    recycle_eval: bool = True
    """Use this step's scheduled evaluation as the anchor when there is one (the paper)."""
    lambda_min: float = 1.0
    lambda_max: float = 5000.0
    n_lambda: int = 15
    """Penalty grid: n_lambda log-spaced values in [lambda_min, lambda_max]."""
    epsilons: tuple[float, ...] = solver.EPSILONS
    """Safety margins ε added inside the hinge."""
    solver: Literal["exact", "slsqp"] = "exact"
    fallback: Literal["grid", "minimax"] = "grid"
    """Without a feasible candidate: least-violating grid point (paper), or also the exact
    least-max-violation mixture."""
    noise_margin: float = 0.0
    """Beyond the paper (which lists noise-aware slopes as future work): solve with every
    constraint slope raised by this many standard errors, S_ij + k·SE(S_ij), so a mixture
    counts as keeping a constraint only if it does so with k standard errors to spare.
    SE(S_ij) comes from the probe's per-example losses, paired (the same examples before and
    after). 0 = the paper's rule. The margin is linear in w (Σ_j w_j SE_ij bounds the standard
    error of Σ_j w_j S_ij from above), so the problem keeps its form."""
    noise_warnings: bool = True
    """Warn once per constraint when the evaluation noise, not the mixture, would decide it."""
    ga_batches: int | None = None
    """Evaluation batches for gradient alignment's g_i (null: probe_batches)."""
    ga_batch_size: int | None = None
    """Examples of D_j behind gradient alignment's d_j (null: micro_batch_size x processes, which
    changes with the process count when train.micro_batch_size is pinned; set it for runs that
    must match across process counts). Rounded down to a multiple of the process count."""

    def __post_init__(self):
        for key in ("interval", "c_max", "probe_batches", "n_lambda"):
            check(getattr(self, key) >= 1, f"mixer.{key}", "must be >= 1", getattr(self, key))
        check(
            0 < self.lambda_min <= self.lambda_max,
            "mixer.lambda_min/lambda_max",
            "need 0 < lambda_min <= lambda_max",
            (self.lambda_min, self.lambda_max),
        )
        check(
            bool(self.epsilons) and all(e >= 0 for e in self.epsilons),
            "mixer.epsilons",
            "need one or more values >= 0",
            list(self.epsilons),
        )
        check(
            0 <= self.noise_margin < float("inf"),
            "mixer.noise_margin",
            "must be finite and >= 0",
            self.noise_margin,
        )
        for key in ("ga_batches", "ga_batch_size"):
            v = getattr(self, key)
            check(v is None or v >= 1, f"mixer.{key}", "must be >= 1 or null", v)


class DynaMiCS:
    Config = DynaMiCSConfig

    @staticmethod
    def requires(o: DynaMiCSConfig) -> dict[str, str]:
        need = {
            "evaluate": "mixer 'dynamics' evaluates the domains at every update",
            "fixed_length": "mixer 'dynamics' scales its updates and probe horizons to max_steps",
        }
        if o.slopes == "gradient_alignment":
            need["whole_params"] = (
                "mixer.slopes: DynaMiCS gradient alignment flattens whole gradients "
                "(mixer.slopes=probe does not)"
            )
        else:
            need["probe"] = "mixer 'dynamics' probes each dataset with short branch runs"
        return need

    def __init__(
        self,
        options: DynaMiCSConfig,
        datasets: list[DatasetInfo],
        domains: list[DomainInfo],
        seed: int,
    ):
        self.o = options
        self.datasets, self.domains = datasets, domains
        self.targets = [i for i, d in enumerate(domains) if d.role == "target"]
        self.constraints = [i for i, d in enumerate(domains) if d.role == "constraint"]
        if not self.targets and not self.constraints:
            raise ConfigError(
                "mixer: 'dynamics' needs at least one evals[] domain with role target or constraint"
            )
        used = [domains[i] for i in self.targets + self.constraints]
        self.need_accuracy = any(d.metric == "accuracy" for d in used)
        if options.slopes == "gradient_alignment" and self.need_accuracy:
            raise ConfigError(
                "mixer.slopes: gradient_alignment needs metric: loss on every "
                "target and constraint domain (accuracy has no gradient)"
            )
        self.lambdas = solver.lambda_grid(options.n_lambda, options.lambda_min, options.lambda_max)
        self.refs: dict[str, float] | None = None  # constraint references, native units
        self.pending: dict | None = None  # last prediction, checked at the next update
        self.warned: list[str] = []  # constraints already warned about (noise)

    def update_steps(self, max_steps: int) -> Steps:
        return schedule_steps(self.o.schedule, max_steps, self.o.interval)

    # -----------------------------------------------------------------------------------------
    def propose(self, ctx: MixContext) -> Weights:
        names = [d.name for d in self.domains]
        H = horizon(self.update_steps(ctx.max_steps), ctx.step, ctx.max_steps)
        c = min(H, self.o.c_max)
        # Anchors: the scheduled evaluation of this step when there is one (evaluation
        # recycling, computed on the probe budget's batches), else the probe budget, so anchors
        # and probes see the same examples.
        now = ctx.evaluate(
            self.o.probe_batches,
            accuracy=self.need_accuracy,
            per_example=True,
            **({} if self.o.recycle_eval else {"use_cache": False}),
        )
        if self.refs is None:
            self.refs = Constraints.from_step0(self.domains, now).references
            ctx.log("references", dict(self.refs))
            ctx.log("roles", {d.name: d.role for d in self.domains})
        cons = Constraints(self.domains, self.refs)
        L = np.array([value(now[d.name], d) for d in self.domains])  # (M,) loss-like
        L_se = np.array([value_se(now[d.name], d) for d in self.domains])  # (M,)
        self._log_realised(ctx, L)

        t0 = time.perf_counter()
        S, S_se = self._slopes(ctx, now, L, c)  # (M, K) each: loss-like change per step
        probe_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        refs = np.array(
            [cons.ref_loss_like(d.name) if d.role == "constraint" else 0.0 for d in self.domains]
        )
        # noise_margin: constraint slopes raised by k standard errors (0: the paper)
        S_solve = S.copy()
        if self.o.noise_margin:
            S_solve[self.constraints] += self.o.noise_margin * np.nan_to_num(S_se[self.constraints])
        problem = solver.Problem.build(S_solve, L, refs, self.targets, self.constraints, H)
        choice = solver.choose(
            problem, self.lambdas, self.o.epsilons, self.o.solver, self.o.fallback
        )
        solve_seconds = time.perf_counter() - t0
        w = choice.weights
        predicted = L + H * S @ w
        self.pending = {"step": ctx.step + H, "values": dict(zip(names, predicted.tolist()))}
        if self.o.noise_warnings:
            self._warn_noise(ctx, now, L, L_se, S, S_se, refs, H)

        ds = [d.name for d in self.datasets]
        ctx.log("S", {n: dict(zip(ds, row)) for n, row in zip(names, S.tolist())})
        ctx.log("S_se", {n: dict(zip(ds, row)) for n, row in zip(names, S_se.tolist())})
        ctx.log("anchor", dict(zip(names, L.tolist())))
        ctx.log("anchor_se", dict(zip(names, L_se.tolist())))
        ctx.log("predicted", dict(self.pending["values"]))
        ctx.log("predicted_step", ctx.step + H)
        ctx.log("horizon", H)
        ctx.log("probe_steps", c if self.o.slopes == "probe" else 0)
        ctx.log("lambda", choice.lam)
        ctx.log("epsilon", choice.eps)
        ctx.log("feasible", bool(choice.feasible))
        ctx.log("n_feasible", choice.n_feasible)
        ctx.log("max_violation", choice.max_violation)
        ctx.log("target_slope", choice.target)
        ctx.log("probe_seconds", probe_seconds)
        ctx.log("solve_seconds", solve_seconds)
        return w

    def _slopes(
        self, ctx: MixContext, now: dict, L: np.ndarray, c: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """S and its standard errors, (M, K) each, measured the configured way."""
        M, K = len(self.domains), len(self.datasets)
        if self.o.slopes == "gradient_alignment":
            batches = self.o.ga_batches or self.o.probe_batches
            return from_gradient_alignment(ctx, M, K, batches, self.o.ga_batch_size)
        return from_probes(
            ctx, self.domains, K, now, L, c, self.o.probe_batches, self.need_accuracy
        )

    def _warn_noise(self, ctx: MixContext, now: dict, L, L_se, S, S_se, refs, H: int) -> None:
        """Say once per constraint, in plain words, when noise rather than the mixture decides
        it (:func:`~mixtune.mixers.dynamics.slopes.noise_notes`)."""
        found = noise_notes(
            self.domains, self.constraints, self.warned, now, L, L_se, S, S_se, refs, H
        )
        self.warned += list(found)
        notes = list(found.values())
        for note in notes:
            log.warning("dynamics: %s", note)
        if notes:
            ctx.log("noise_warnings", notes)

    def _log_realised(self, ctx: MixContext, L: np.ndarray) -> None:
        """The previous update's prediction for this step against what happened."""
        if self.pending is None or self.pending["step"] != ctx.step:
            return
        names = [d.name for d in self.domains]
        real = dict(zip(names, L.tolist()))
        pred = self.pending["values"]
        ctx.log("realised", real)
        ctx.log("prediction_error", {n: real[n] - pred[n] for n in names if n in pred})

    # -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"refs": self.refs, "pending": self.pending, "warned": list(self.warned)}

    def load_state_dict(self, state: dict) -> None:
        self.refs = state.get("refs")
        self.pending = state.get("pending")
        self.warned = list(state.get("warned", []))
