"""DFT: Dynamic Fine-Tuning (``loss.name: dft``; Wu et al., arXiv 2508.05629).

Per token -sg(p) log p. Deviations: none in the default ``normalizer: step``, which is TRL's
averaging; ``micro_batch`` reproduces the official verl per-micro-batch mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from mixtune.losses.base import Loss
from mixtune.losses.core import LossTerms, micro_batch_scales, token_losses

if TYPE_CHECKING:
    from mixtune.engine.state import TrainState

# DFT: Dynamic Fine-Tuning (Wu et al., "On the Generalization of SFT: A Reinforcement Learning
# Perspective with Reward Rectification", arXiv 2508.05629).
#
# Per token: l_t = -sg(p_t) * log p_t with p_t = pi(y*_t | y*_<t, x), i.e. the cross-entropy times
# the stop-gradient probability of the target token (Eq. 9; gradient -grad p_t, bounded by p_t).
# Averaged over response tokens like the official code, through `reduce`: the normaliser is the
# step's global supervised-token count (TRL's `num_items_in_batch`), not the official verl
# trainer's per-micro-batch token mean; `normalizer: micro_batch` reproduces the latter.


def dft(logits: torch.Tensor, labels: torch.Tensor) -> LossTerms:
    """Cross-entropy with token weights ``sg(p)``, ``p = exp(-nll)`` (0 on masked tokens)."""
    return dft_terms(*token_losses(logits, labels))


def dft_terms(nll: torch.Tensor, mask: torch.Tensor) -> LossTerms:
    """:func:`dft` from per-token NLL and mask."""
    p = torch.exp(-nll.detach()) * mask  # (B, T-1), stop-gradient token probability
    return LossTerms(nll, mask, token_weights=p)


class TokenProbStats:
    """Running mean of the DFT token probability and the share of tokens below 0.1 / above 0.9
    (DFT's bimodality, paper Fig. 2). A step's numbers count once ``commit`` is called from
    ``after_step``, so the branch steps of probing mixers are left out; summed over ranks at log
    steps, then reset."""

    def __init__(self):
        self.sums = None  # (4,) float64: sum p, tokens, tokens p < 0.1, tokens p > 0.9
        self.pending = None  # the same for the step in progress

    def add(self, p: torch.Tensor, mask: torch.Tensor) -> None:
        m = mask.double()
        pd = p.detach().double()
        row = torch.stack([(pd * m).sum(), m.sum(), ((pd < 0.1) * m).sum(), ((pd > 0.9) * m).sum()])
        self.pending = row if self.pending is None else self.pending + row

    def commit(self) -> None:
        if self.pending is not None:
            self.sums = (
                self.pending
                if self.sums is None
                else self.sums.to(self.pending.device) + self.pending
            )
        self.pending = None

    def state_dict(self, world: int) -> dict:
        # Only one process's sums reach the checkpoint: keep them when that is all of them.
        return {"sums": self.sums.cpu() if world == 1 and self.sums is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.sums = state.get("sums")

    def take(self, state: TrainState) -> dict[str, float]:
        s = (
            self.sums
            if self.sums is not None
            else torch.zeros(4, dtype=torch.float64, device=state.acc.device)
        )
        if state.world > 1:
            s = state.acc.reduce(s.to(state.acc.device), reduction="sum")
        s = s.cpu().tolist()  # host sync: log steps only
        self.sums = None
        n = max(s[1], 1.0)
        return {"p_mean": s[0] / n, "p_low": s[2] / n, "p_high": s[3] / n}


@dataclass(frozen=True)
class DFTConfig:
    normalizer: Literal["step", "micro_batch"] = "step"
    """``step``: divide by the step's global supervised-token count (exact under gradient
    accumulation; TRL's ``loss_type="dft"``). ``micro_batch``: the official verl trainer's
    token mean per micro-batch, averaged over micro-batches and ranks (depends on the split)."""


class DFT(Loss):
    """Dynamic Fine-Tuning (``loss.name: dft``): token CE weighted by the detached p(token)."""

    Config = DFTConfig

    def __init__(self, options: DFTConfig | None = None):
        self.options = options or DFTConfig()
        self.probs = TokenProbStats()
        self.world = 1

    def prepare(self, state: TrainState, batches: list[dict]) -> list[dict | None]:
        self.probs.pending = None  # drop what a probing mixer's branch steps added
        self.world = state.world
        if self.options.normalizer == "step":
            return [None] * len(batches)
        return [{"scale": s} for s in micro_batch_scales(state, batches)]

    def terms(self, nll: torch.Tensor, mask: torch.Tensor, extra=None) -> LossTerms:
        terms = dft_terms(nll, mask)
        self.probs.add(terms.token_weights, terms.mask)
        if extra is not None:
            terms.sample_weights = torch.full((mask.shape[0],), extra["scale"], device=mask.device)
        return terms

    def after_step(self, state: TrainState) -> None:
        self.probs.commit()

    def diagnostics(self, state: TrainState) -> dict[str, float]:
        return self.probs.take(state)

    def state_dict(self) -> dict:
        return {"probs": self.probs.state_dict(self.world)}

    def load_state_dict(self, state: dict) -> None:
        self.probs.load_state_dict(state["probs"])
