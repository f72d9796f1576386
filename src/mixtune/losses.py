"""Per-token losses and the one reduction every loss goes through.

A loss is a function ``(logits, labels) -> LossTerms``: per-token negative log-likelihoods plus
optional token weights (DFT) and sample weights (CADFT). :func:`reduce` applies the mask and the
weights and divides by a token count given by the caller. The engine passes the number of
supervised tokens in the *whole* optimizer step (all micro-batches, all ranks), so summing the
micro-batch losses reproduces the full-batch loss exactly: gradient accumulation is exact, and
8 micro-batches of 1 give the same gradient as 4 of 2 or 1 of 8.

The loss protocol (a registered class, built with its validated ``Config`` options):

- ``__call__(logits, labels, extra) -> LossTerms`` for one micro-batch; ``extra`` is what
  ``prepare`` returned for it (or None).
- optional ``prepare(trainer, batches) -> list[dict]``: called once per optimizer step with all
  of this rank's micro-batches (each holds ``input_ids``, ``labels``, ``attention_mask``,
  ``domain`` and ``index``, the example ids) before any backward pass — for statistics over
  the global batch (all-reduce across ranks through ``trainer.acc``).
- optional ``after_step(trainer)``: after each optimizer step (e.g. rewriting targets with
  ``trainer.replace_example``).
- optional ``diagnostics(trainer) -> dict``: logged under ``"loss"`` at log steps (every rank
  calls it together, so it may all-reduce).
- optional ``state_dict()`` / ``load_state_dict()``: saved in checkpoints (``loss.pt``).

Registered losses (``LOSSES``): ``sft``; ``dft`` (Wu et al., arXiv 2508.05629: per token
-sg(p) log p, see below; deviations: none in the default ``normalizer: step``, which is TRL's
averaging; ``micro_batch`` reproduces the official verl per-micro-batch mean); ``cadft``
(:mod:`mixtune.losses_cadft`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class LossTerms:
    per_token: torch.Tensor  # (B, T-1) NLL, 0 where masked
    mask: torch.Tensor  # (B, T-1) bool, True on supervised tokens
    token_weights: torch.Tensor | None = None  # (B, T-1), detached
    sample_weights: torch.Tensor | None = None  # (B,), detached


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of next-token prediction, in fp32.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) token ids with ``IGNORE`` (-100) on positions not to learn.
    Returns:
        ``(nll, mask)``, both (B, T-1): position t scores token t+1; nll is 0 where masked.
    """
    # Score all T positions and drop the last, rather than slicing the logits first: a slice of
    # the (B, T, V) logits is not contiguous, and reshaping it would copy it and its gradient.
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T): position t predicts t+1
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(target.shape)
    return nll[:, :-1].contiguous(), target[:, :-1] != IGNORE


def reduce(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    token_w: torch.Tensor | None = None,
    sample_w: torch.Tensor | None = None,
    n_tokens: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of (weighted) masked per-token losses divided by ``n_tokens``.

    ``n_tokens`` defaults to this batch's supervised-token count, which gives the usual token
    mean; the engine passes the global count of the optimizer step instead. Token weights
    multiply each token; sample weights multiply every token of their sequence.
    """
    x = per_token * mask
    if token_w is not None:
        x = x * token_w
    if sample_w is not None:
        x = x * sample_w[:, None]
    if n_tokens is None:
        n_tokens = mask.sum().clamp(min=1)
    return x.sum() / n_tokens


def sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token loss of each sequence, (B,) (0 for a sequence with no supervised token)."""
    counts = mask.sum(-1)
    return (per_token * mask).sum(-1) / counts.clamp(min=1)


def sft(logits: torch.Tensor, labels: torch.Tensor) -> LossTerms:
    """Standard supervised fine-tuning: token cross-entropy on response tokens."""
    nll, mask = token_losses(logits, labels)
    return LossTerms(nll, mask)


class SFT:
    """Cross-entropy on response tokens (``loss.name: sft``)."""

    Config = None

    def __init__(self, options=None):
        pass

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, extra=None) -> LossTerms:
        return sft(logits, labels)


# ----------------------------------------------------------------------------------------------
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
    nll, mask = token_losses(logits, labels)
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

    def take(self, trainer) -> dict[str, float]:
        s = (
            self.sums
            if self.sums is not None
            else torch.zeros(4, dtype=torch.float64, device=trainer.acc.device)
        )
        if trainer.world > 1:
            s = trainer.acc.reduce(s.to(trainer.acc.device), reduction="sum")
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


class DFT:
    """Dynamic Fine-Tuning (``loss.name: dft``): token CE weighted by the detached p(token)."""

    Config = DFTConfig

    def __init__(self, options: DFTConfig | None = None):
        self.options = options or DFTConfig()
        self.probs = TokenProbStats()
        self.world = 1

    def prepare(self, trainer, batches: list[dict]) -> list[dict | None]:
        self.probs.pending = None  # drop what a probing mixer's branch steps added
        self.world = trainer.world
        if self.options.normalizer == "step":
            return [None] * len(batches)
        return [{"scale": s} for s in micro_batch_scales(trainer, batches)]

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, extra=None) -> LossTerms:
        terms = dft(logits, labels)
        self.probs.add(terms.token_weights, terms.mask)
        if extra is not None:
            terms.sample_weights = torch.full(
                (labels.shape[0],), extra["scale"], device=labels.device
            )
        return terms

    def after_step(self, trainer) -> None:
        self.probs.commit()

    def diagnostics(self, trainer) -> dict[str, float]:
        return self.probs.take(trainer)

    def state_dict(self) -> dict:
        return {"probs": self.probs.state_dict(self.world)}

    def load_state_dict(self, state: dict) -> None:
        self.probs.load_state_dict(state["probs"])


def micro_batch_scales(trainer, batches: list[dict]) -> list[float]:
    """Sample weights turning the step-token normaliser into verl's per-micro-batch mean.

    The loop computes ``sum / n_step * world`` per micro-batch and DDP averages over ranks; verl
    computes ``sum / n_mb / n_micro`` and DDP averages. Weight ``n_step / (world * n_micro *
    n_mb)`` makes the first equal the second.
    """
    counts = [float((b["labels"][:, 1:] != IGNORE).sum()) for b in batches]  # host sync, tiny
    total = torch.tensor(sum(counts), dtype=torch.float64, device=trainer.acc.device)
    if trainer.world > 1:
        total = trainer.acc.reduce(total, reduction="sum")
    n_step = float(total)
    return [n_step / (trainer.world * len(batches) * max(c, 1.0)) for c in counts]


# The CADFT loss lives in its own module; imported last because it builds on the functions above.
from mixtune.losses_cadft import CADFT  # noqa: E402

LOSSES: dict[str, type] = {"sft": SFT, "dft": DFT, "cadft": CADFT}


def build_loss(cfg) -> object:
    """Instantiate the loss named in ``cfg`` (a :class:`mixtune.config.MethodConfig`)."""
    from mixtune.config import method_options

    cls = LOSSES[cfg.name]
    return cls(method_options(cfg, LOSSES, "loss"))
