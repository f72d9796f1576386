"""DynamixSFT: a bandit over the training datasets, rewarded by a one-step look-ahead.

Shin, Ji, Liu, Yu, Chen, Gong, "DynamixSFT: Dynamic Mixture Optimization of Instruction Tuning
Collections", arXiv 2508.12116 (ACL 2026 Findings). Each dataset is an arm of a non-stationary
bandit; its reward is how much one gradient step on it lowers its own loss right now.

Update rule (every ``update_every`` = T_update steps; Q starts at 0):

    for every dataset k: draw a mini-batch B_k, per-example loss L_pre, one virtual step on B_k,
        L_post on the same examples, restore the run (``ctx.lookahead``)
    r_k  = mean over x in B_k of (L_pre(x) - L_post(x)) / (L_pre(x) + eps)
    r~_k = (r_k - min r) / (max r - min r)            (all 1/2 when max r = min r)
    Q_k <- alpha * Q_k + (1 - alpha) * r~_k
    p_k  = (1 - gamma) * exp(beta Q_k) p0_k / sum_j exp(beta Q_j) p0_j  +  gamma / K

p0 is the datasets' size proportion (or the user's prior) and multiplies the policy for the
whole run. Defaults are the paper's: gamma 0.3, alpha 0.95, beta 4, T_update 50.

Deliberate choices and deviations (the paper leaves 1-4 unspecified):

1. Virtual step: ``optimizer: sgd`` (default) is a plain gradient step at the run's current LR,
   with no optimizer state copied. The paper's first-order analysis (r ~ lr * |grad|^2 / L) is
   of that step, and since r is min-max normalised, the LR scale cancels: only how the datasets
   compare matters. ``adam`` steps a copy of the run's AdamW moments (the step the run would
   actually take), at the cost of copying the optimizer state at every look-ahead.
2. The reward batch is drawn with its own generator keyed by (seed, dataset, step), separate
   from the training stream; its size defaults to the run's micro-batch x processes
   (``batch_size`` to change it). L_pre is read off the forward pass that is back-propagated
   when the model has no active dropout; with dropout, L_pre and L_post are measured in eval
   mode (the same masks-free forward twice) and the step follows the train-mode gradient.
3. eps = 1e-8; initial Q = 0, so the first policy is (1 - gamma) p0 + gamma / K.
4. The first look-ahead is at step T_update (the policy at step 0 comes from Q = 0).
5. ``reward: progress`` is a cheaper, forward-only variant that is NOT the paper's reward: at
   each update the relative loss drop, over the last T_update real training steps, of the
   mini-batch drawn at the previous update (two forward passes per dataset, no backward, no
   snapshot). It measures progress under the current mixture rather than the effect of a step
   on one dataset alone, and gives no reward at the first update. The paper's 12.7% overhead
   figure assumes a forward-only reward of this kind of cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mixtune import simplex
from mixtune.errors import ConfigError, MixtuneError
from mixtune.mixers.base import DatasetInfo, MixContext, Steps, Weights
from mixtune.schema import check


@dataclass(frozen=True)
class DynamixSFTConfig:
    gamma: float = 0.3
    """Exploration floor: every dataset keeps at least gamma / K of the mixture."""
    alpha: float = 0.95
    """EMA factor of Q (weight of the old value)."""
    beta: float = 4.0
    """Inverse temperature of the Boltzmann policy (the paper uses 4 at 1B, 5 at 8B)."""
    update_every: int = 50
    """T_update: steps between reward measurements and policy updates."""
    reward: Literal["lookahead", "progress"] = "lookahead"
    """``lookahead`` (the paper's virtual step) or ``progress`` (forward-only deviation)."""
    optimizer: Literal["sgd", "adam"] = "sgd"
    """The virtual step: plain SGD at the current LR, or a copy of the run's AdamW state."""
    batch_size: int | None = None
    """Reward mini-batch size (global); default: the run's micro-batch x processes."""
    eps: float = 1e-8
    """epsilon in the relative loss drop (L_pre - L_post) / (L_pre + eps)."""
    prior: Literal["examples", "tokens", "uniform"] | dict = "examples"
    """p0: size proportions by examples or supervised tokens, uniform, or {name: share}."""

    def __post_init__(self):
        check(0 <= self.gamma <= 1, "mixer.gamma", "must be in [0, 1]", self.gamma)
        check(0 <= self.alpha < 1, "mixer.alpha", "must be in [0, 1)", self.alpha)
        check(
            self.beta >= 0 and math.isfinite(self.beta),
            "mixer.beta",
            "must be a finite number >= 0",
            self.beta,
        )
        check(self.update_every >= 1, "mixer.update_every", "must be >= 1", self.update_every)
        check(
            self.batch_size is None or self.batch_size >= 1,
            "mixer.batch_size",
            "must be >= 1 or null",
            self.batch_size,
        )
        check(self.eps > 0, "mixer.eps", "must be > 0", self.eps)


def prior_weights(prior, datasets: list[DatasetInfo]) -> np.ndarray:
    """p0 from the ``prior`` option (validated simplex point, dataset order)."""
    names = [d.name for d in datasets]
    if isinstance(prior, dict):
        try:
            return simplex.normalize(prior, names, what="mixer.prior")
        except MixtuneError as e:
            raise ConfigError(str(e)) from None
    if prior == "uniform":
        return np.full(len(datasets), 1.0 / len(datasets))
    n = np.array([d.tokens if prior == "tokens" else d.size for d in datasets], np.float64)
    return simplex.normalize(n, names, what="mixer.prior")


def policy(q: np.ndarray, p0: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """p = (1 - gamma) * softmax(beta q + log p0) + gamma / K (eq. 3 of the paper)."""
    z = np.exp(beta * (q - q.max())) * p0  # shift by max: overflow-free, same ratios
    return (1.0 - gamma) * z / z.sum() + gamma / len(q)


def minmax(r: np.ndarray) -> np.ndarray:
    """Min-max normalisation across datasets; all 1/2 when they are equal."""
    span = r.max() - r.min()
    if not span > 0:
        return np.full_like(r, 0.5)
    return (r - r.min()) / span


class DynamixSFT:
    Config = DynamixSFTConfig

    @staticmethod
    def requires(o: DynamixSFTConfig) -> dict[str, str]:
        need = {"lookahead": "mixer 'dynamixsft' scores each dataset with a look-ahead step"}
        if o.reward == "progress":
            need["random_access"] = (
                "mixer.reward: 'progress' re-measures a mini-batch drawn at an earlier update "
                "(reward: lookahead does not)"
            )
        return need

    def __init__(self, options: DynamixSFTConfig, datasets: list[DatasetInfo], domains, seed: int):
        self.o = options
        self.names = [d.name for d in datasets]
        self.p0 = prior_weights(options.prior, datasets)
        self.q = np.zeros(len(datasets))
        self.updates = 0
        self.pending: dict | None = None  # progress reward: {"key": step, "loss": [[...], ...]}

    def update_steps(self, max_steps: int) -> Steps:
        return Steps.every(self.o.update_every, max_steps)

    def propose(self, ctx: MixContext) -> Weights:
        o = self.o
        if ctx.step > 0:
            raw = self._lookahead(ctx) if o.reward == "lookahead" else self._progress(ctx)
            if raw is not None:
                norm = minmax(raw)
                self.q = o.alpha * self.q + (1.0 - o.alpha) * norm
                self.updates += 1
                ctx.log("reward", dict(zip(self.names, raw.tolist())))
                ctx.log("reward_norm", dict(zip(self.names, norm.tolist())))
        p = policy(self.q, self.p0, o.beta, o.gamma)
        ctx.log("q", dict(zip(self.names, self.q.tolist())))
        ctx.log("p", dict(zip(self.names, p.tolist())))
        return p

    # ------------------------------------------------------------------------------------------
    def _lookahead(self, ctx: MixContext) -> np.ndarray:
        """The paper's reward: relative per-example loss drop after one virtual step."""
        r, pre, secs = np.zeros(len(self.names)), {}, {}
        for j, name in enumerate(self.names):
            res = ctx.lookahead(
                j, optimizer=self.o.optimizer, batch_size=self.o.batch_size, key=ctx.step
            )
            r[j] = float(np.mean((res.pre - res.post) / (res.pre + self.o.eps)))
            pre[name], secs[name] = float(np.mean(res.pre)), float(res.seconds)
        ctx.log("loss_pre", pre)
        ctx.log("lookahead_seconds", secs)
        ctx.log("lookahead_seconds_total", sum(secs.values()))
        return r

    def _progress(self, ctx: MixContext) -> np.ndarray | None:
        """Forward-only deviation: relative loss drop since the last update on the batch drawn
        then (None at the first update, when there is no earlier batch)."""
        if ctx.losses is None:
            raise ConfigError(
                "mixer.reward: 'progress' needs a trainer that provides "
                "ctx.losses (forward-only per-example losses)"
            )
        bs, r = self.o.batch_size, None
        if self.pending is not None:
            r = np.zeros(len(self.names))
            for j in range(len(self.names)):
                before = np.asarray(self.pending["loss"][j], np.float64)
                now = ctx.losses(j, batch_size=bs, key=self.pending["key"])
                r[j] = float(np.mean((before - now) / (before + self.o.eps)))
        fresh = [ctx.losses(j, batch_size=bs, key=ctx.step) for j in range(len(self.names))]
        self.pending = {"key": int(ctx.step), "loss": [f.tolist() for f in fresh]}
        ctx.log("loss_pre", dict(zip(self.names, [float(np.mean(f)) for f in fresh])))
        return r

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "q": self.q.tolist(),
            "updates": self.updates,
            "pending": self.pending,
            "names": list(self.names),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError(f"dynamixsft state is for datasets {state['names']}, not {self.names}")
        self.q = np.asarray(state["q"], np.float64)
        self.updates = int(state["updates"])
        self.pending = state["pending"]
