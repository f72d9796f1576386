"""EXP3 online data mixing (ODM): a bandit that upweights the datasets with high training loss.

Albalak, Pan, Raffel, Wang, "Efficient Online Data Mixing For Language Model Pre-Training",
arXiv 2312.02406 (2023). Each dataset is an arm of an adversarial bandit (EXP3); the reward of an
arm is its training loss ("still much to learn there"), importance-weighted by the probability
with which it was drawn and smoothed over time. It costs nothing beyond the losses the training
steps already compute, which is why it is the usual cheap baseline for online mixing.

Update rule (at every update step t, i.e. every ``update_every`` training steps):

    for every dataset i with training loss L_i since the last update (ctx.train_losses):
        R_i <- alpha * R_i + (1 - alpha) * L_i / pi_i        (pi: weights in effect meanwhile)
    eps_t = min(1/K, sqrt(ln K / (K t)))
    pi_i  = (1 - K eps_t) * exp(eps_{t-1} R_i) / sum_j exp(eps_{t-1} R_j) + eps_t
    (before ``warmup_steps``: pi = the prior, while R already accumulates)

R starts at 0 and eps_0 = 1/K. t counts training steps, as in ODM (one bandit round per step).

Deliberate simplifications (numbered):

1. Mixed batches: mixtune draws the dataset of every example, so one update observes the loss
   of every dataset drawn since the last one, not of a single arm. Each observed dataset's
   estimate is updated as ODM updates its sampled arm (importance weight 1/pi_i kept;
   ``importance_weighting: false`` drops it).
2. Cadence: ODM updates after every step. Reading the per-dataset losses is an all-reduce and a
   host sync, so the default is every 10 steps (``update_every: 1`` is the paper's cadence);
   the loss fed in is the token-mean over those steps.
3. Warm-up: ODM trains its first 2,000 of 100,000 steps on the initial weights; the default
   here is the same 2% of ``max_steps`` (``warmup_steps`` to set it), on the ``prior`` weights.
4. alpha = 0.9 and no reward rescaling: the paper's smoothing value is not restated in our
   notes (the authors' scripts also ran 0.5); the raw token-mean loss is the reward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mixtune import simplex
from mixtune.mixers.base import DatasetInfo, MixContext, Steps, Weights
from mixtune.schema import check


@dataclass(frozen=True)
class EXP3Config:
    update_every: int = 10
    """Steps between updates (ODM: 1; each update syncs the per-dataset losses to the host)."""
    alpha: float = 0.9
    """Smoothing of the reward estimate R (weight of the old value)."""
    warmup_steps: int | None = None
    """Steps trained on the prior weights before the bandit takes over (null: 2% of max_steps)."""
    prior: Literal["examples", "tokens", "uniform"] = "examples"
    """Weights during warm-up: size proportions (examples or supervised tokens), or uniform."""
    importance_weighting: bool = True
    """Divide each loss by its dataset's sampling probability (EXP3's unbiased estimate)."""

    def __post_init__(self):
        check(self.update_every >= 1, "mixer.update_every", "must be >= 1", self.update_every)
        check(0 <= self.alpha < 1, "mixer.alpha", "must be in [0, 1)", self.alpha)
        check(
            self.warmup_steps is None or self.warmup_steps >= 0,
            "mixer.warmup_steps",
            "must be >= 0 or null",
            self.warmup_steps,
        )


def exploration(t: int, k: int) -> float:
    """eps_t = min(1/K, sqrt(ln K / (K t))); 1/K at t = 0."""
    return 1.0 / k if t <= 0 else min(1.0 / k, math.sqrt(math.log(k) / (k * t)))


class EXP3:
    Config = EXP3Config

    @staticmethod
    def requires(o: EXP3Config) -> dict[str, str]:
        need = {"train_losses": "mixer 'exp3' rewards datasets by their training loss"}
        if o.warmup_steps is None:
            need["fixed_length"] = "mixer.warmup_steps: null warms up for 2% of max_steps"
        return need

    def __init__(self, options: EXP3Config, datasets: list[DatasetInfo], domains, seed: int):
        self.o = options
        self.names = [d.name for d in datasets]
        if options.prior == "uniform":
            prior = np.ones(len(datasets))
        else:
            prior = [d.tokens if options.prior == "tokens" else d.size for d in datasets]
        self.prior = simplex.normalize(prior, self.names, what="mixer.prior")
        self.r = np.zeros(len(datasets))
        self.prev_eps = 1.0 / len(datasets)

    def update_steps(self, max_steps: int) -> Steps:
        return Steps.every(self.o.update_every, max_steps)

    def propose(self, ctx: MixContext) -> Weights:
        o, k, t = self.o, len(self.names), ctx.step
        observed = {}
        for i, name in enumerate(self.names):
            loss = ctx.train_losses.get(name)
            if t == 0 or loss is None or not math.isfinite(loss):
                continue  # not drawn since the last update: no observation for this arm
            pi = max(float(ctx.weights[i]), 1e-12) if o.importance_weighting else 1.0
            self.r[i] = o.alpha * self.r[i] + (1.0 - o.alpha) * loss / pi
            observed[name] = loss
        eps = exploration(t, k)
        warmup = round(0.02 * ctx.max_steps) if o.warmup_steps is None else o.warmup_steps
        if t < warmup:
            p = self.prior.copy()
        else:
            z = np.exp(self.prev_eps * (self.r - self.r.max()))  # shift: same softmax
            p = (1.0 - k * eps) * z / z.sum() + eps
        self.prev_eps = eps
        ctx.log("loss", observed)
        ctx.log("reward_estimate", dict(zip(self.names, self.r.tolist())))
        ctx.log("eps", eps)
        ctx.log("p", dict(zip(self.names, p.tolist())))
        return p

    def state_dict(self) -> dict:
        return {"r": self.r.tolist(), "prev_eps": self.prev_eps, "names": list(self.names)}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError(f"exp3 state is for datasets {state['names']}, not {self.names}")
        self.r = np.asarray(state["r"], np.float64)
        self.prev_eps = float(state["prev_eps"])
