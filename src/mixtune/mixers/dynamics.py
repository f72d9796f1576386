"""DynaMiCS: constrained dynamic mixtures from probing slope matrices.

Gualdoni, Laguna, Béthune, Monteiro, Ablin, Cuturi, "DynaMiCS: fine-tuning LLMs with performance
constraints using dynamic mixtures", arXiv 2605.10770 (2026).

Evaluation domains are targets T (improve), constraints C (stay at or under a reference: the base
model's value at step 0, or a given number) or monitors (logged only). At each scheduled update
t, with H_t the gap to the next update (or to the end):

1. anchors L_i(θ_t) for every domain (reusing the scheduled evaluation of this step);
2. for each dataset j: from a snapshot of parameters, optimizer, RNG and sampler, train
   c_t = min(H_t, c_max) steps on D_j alone with the run's optimizer and LR, evaluate every
   domain on the probe budget, restore. S_ij = (L_i after − L_i now) / c_t;
3. for each (λ, ε) of the grid (15 log-spaced λ in [1, 5000], ε ∈ {0, .05, .1}) minimise
   Σ_{i∈T} S_i·w + λ Σ_{i∈C} max(0, L_i + H_t·S_i·w − L_i^ref + ε)² over the simplex
   (``dynamics_solver``); keep the feasible solution (every L_i + H_t·S_i·w <= L_i^ref) with
   the lowest target term, else the one with the smallest maximum predicted violation;
4. hold w* until the next update.
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

from mixtune.errors import ConfigError, MixtuneError
from mixtune.eval.constraints import Constraints, loss_like, native
from mixtune.eval.domains import loss_se, mean_se
from mixtune.mixers import dynamics_solver as solver
from mixtune.mixers.base import DatasetInfo, DomainInfo, MixContext, Steps, Weights

# The paper's update sets for a 2048-step run (all include step 0).
SCHEDULES = {
    "no_warmup": [0] + [64 * 2**k for k in range(5)],  # 0, 64, 128, ..., 1024
    "light_warmup": [0] + [8 * 2**k for k in range(8)],  # 0, 8, 16, ..., 1024
    "dense_warmup": [0] + [2 * 2**k for k in range(10)],  # 0, 2, 4, ..., 1024
}
PAPER_STEPS = 2048
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
            if getattr(self, key) < 1:
                raise ConfigError(f"mixer.{key}: must be >= 1, got {getattr(self, key)}")
        if not 0 < self.lambda_min <= self.lambda_max:
            raise ConfigError(
                f"mixer.lambda_min/lambda_max: need 0 < lambda_min <= lambda_max,"
                f" got {self.lambda_min}, {self.lambda_max}"
            )
        if not self.epsilons or any(e < 0 for e in self.epsilons):
            raise ConfigError(
                f"mixer.epsilons: need one or more values >= 0, got {list(self.epsilons)}"
            )
        if not 0 <= self.noise_margin < float("inf"):
            raise ConfigError(
                f"mixer.noise_margin: must be finite and >= 0, got {self.noise_margin}"
            )
        for key in ("ga_batches", "ga_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"mixer.{key}: must be >= 1 or null, got {getattr(self, key)}")


def schedule_steps(kind: str, max_steps: int, interval: int = 128) -> Steps:
    """Update steps for a run of ``max_steps`` (0 first; every step < max_steps), lazily."""
    if kind == "fixed":
        return Steps.every(interval, max_steps)
    scaled = {0} | {max(1, round(s * max_steps / PAPER_STEPS)) for s in SCHEDULES[kind][1:]}
    return Steps(s for s in scaled if s < max_steps)


def horizon(steps, step: int, max_steps: int) -> int:
    """H_t: steps until the next update, or until the end of the run."""
    if not isinstance(steps, Steps):
        steps = Steps(steps)
    nxt = steps.after(step)
    return (max_steps if nxt is None else nxt) - step


class DynaMiCS:
    Config = DynaMiCSConfig

    @staticmethod
    def requires(o: DynaMiCSConfig) -> dict[str, str]:
        need = {"evaluate": "mixer 'dynamics' evaluates the domains at every update"}
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
        # recycling), else the probe budget, so anchors and probes see the same batches.
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
        L = np.array([self._value(now[d.name], d) for d in self.domains])  # (M,) loss-like
        L_se = np.array([self._value_se(now[d.name], d) for d in self.domains])  # (M,)
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

    def _value(self, m: dict, d: DomainInfo) -> float:
        # Monitors are followed in loss (their accuracy is not evaluated in probes).
        return loss_like(m, "loss" if d.role == "monitor" else d.metric, d.name)

    def _value_se(self, m: dict, d: DomainInfo) -> float:
        """Standard error of :meth:`_value` over the evaluated examples (NaN if unknown)."""
        sc = m.get("scores")
        if d.role != "monitor" and d.metric == "accuracy":
            return float("nan") if sc is None or sc.correct is None else mean_se(sc.correct)
        return float(m.get("loss_se", float("nan")))

    def _paired_se(self, before: dict, after: dict, d: DomainInfo) -> float:
        """Standard error of the change after − before of domain ``d``'s value, paired over
        the same examples (what the probe did, not which examples were drawn)."""
        a, b = after.get("scores"), before.get("scores")
        if a is None or b is None or a.nll.size != b.nll.size:
            return float("nan")
        if d.role != "monitor" and d.metric == "accuracy":
            if a.correct is None or b.correct is None:
                return float("nan")
            return mean_se(b.correct - a.correct)  # loss-like: −accuracy
        return loss_se(a.nll - b.nll, b.tokens)

    def _slopes(
        self, ctx: MixContext, now: dict, L: np.ndarray, c: int
    ) -> tuple[np.ndarray, np.ndarray]:
        M, K = len(self.domains), len(self.datasets)
        if self.o.slopes == "gradient_alignment":
            if getattr(ctx, "grad_alignment", None) is None:
                raise MixtuneError(
                    "slopes: gradient_alignment needs ctx.grad_alignment, which "
                    "this training loop does not provide"
                )
            S = np.asarray(
                ctx.grad_alignment(
                    self.o.ga_batches or self.o.probe_batches, batch_size=self.o.ga_batch_size
                ),
                np.float64,
            )
            return S.reshape(M, K), np.full((M, K), np.nan)  # no per-example noise estimate
        S, S_se = np.zeros((M, K)), np.zeros((M, K))
        for j in range(K):
            after = ctx.probe(
                j, c, self.o.probe_batches, accuracy=self.need_accuracy, per_example=True
            )
            for i, d in enumerate(self.domains):
                S[i, j] = (self._value(after[d.name], d) - L[i]) / c
                S_se[i, j] = self._paired_se(now[d.name], after[d.name], d) / c
        return S, S_se

    def _warn_noise(self, ctx: MixContext, now: dict, L, L_se, S, S_se, refs, H: int) -> None:
        """Say once, in plain words, when noise rather than the mixture decides a constraint:
        every dataset moves it past its reference by more than the reference's own noise, or
        no dataset moves it by more than the probes' noise."""
        notes = []
        for i in self.constraints:
            d = self.domains[i]
            if d.name in self.warned or not np.isfinite(L_se[i]):
                continue
            move, noise = H * S[i], H * S_se[i]
            n = now[d.name].get("n", "?")
            unit = "accuracy" if d.metric == "accuracy" else "loss"
            base = f"{native(refs[i], d.metric):.3f} ± {L_se[i]:.3f} on {n} examples"
            if np.all(move + L[i] - refs[i] > L_se[i]):
                notes.append(
                    f"{d.name}: reference {unit} {base}; every dataset moves it past "
                    f"the reference by more than its noise; raise evals.{d.name}."
                    "batches or set a tolerance (evals[].reference)"
                )
            elif np.all(np.isfinite(noise)) and np.all(np.abs(move) < 2 * noise):
                notes.append(
                    f"{d.name}: no dataset moves it by more than the probes' noise "
                    f"(largest predicted change {np.abs(move).max():.4f} vs ± "
                    f"{noise.max():.4f}); raise evals.{d.name}.batches or "
                    "mixer.probe_batches"
                )
            else:
                continue
            self.warned.append(d.name)
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


def plot_slopes(records: list[dict], out_png, max_panels: int = 8):
    """Heatmaps of the slope matrices S logged at the updates (rows: evaluation domains, marked
    T/C for targets/constraints; columns: datasets; red = that domain's loss goes up when
    training on that dataset). Returns the path, or None when the run logged no slopes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = next(
        (
            r["mixer"]["roles"]
            for r in records
            if isinstance(r.get("mixer"), dict) and isinstance(r["mixer"].get("roles"), dict)
        ),
        {},
    )
    found = [
        (r["step"], r["mixer"]["S"])
        for r in records
        if isinstance(r.get("mixer"), dict) and isinstance(r["mixer"].get("S"), dict)
    ]
    if not found:
        return None
    if len(found) > max_panels:  # keep the first, the last and evenly spaced ones between
        idx = np.unique(np.linspace(0, len(found) - 1, max_panels).round().astype(int))
        found = [found[i] for i in idx]
    domains = list(found[0][1])
    datasets = list(found[0][1][domains[0]])
    mats = [
        np.array([[S[d].get(k, np.nan) for k in datasets] for d in domains], float)
        for _, S in found
    ]
    vmax = max(float(np.nanmax(np.abs(m))) for m in mats) or 1.0
    n = len(mats)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(2.2 + 1.0 * len(datasets) * cols, 0.9 + 0.45 * len(domains) * rows),
        squeeze=False,
    )
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (step, _), m in zip(axes.flat, found, mats):
        im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_title(f"step {step}", fontsize=9)
        ax.set_xticks(range(len(datasets)), datasets, rotation=45, ha="right", fontsize=7)
        tags = {"target": " (T)", "constraint": " (C)"}
        ax.set_yticks(
            range(len(domains)), [d + tags.get(roles.get(d), "") for d in domains], fontsize=7
        )
    fig.colorbar(
        im, ax=axes.ravel().tolist(), shrink=0.8, label="slope S (loss-like change per step)"
    )
    fig.suptitle("DynaMiCS slope matrices (rows: eval domains, columns: datasets)", fontsize=10)
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out_png
