"""Per-token losses and the one reduction every loss goes through.

A loss turns ``(logits, labels)`` into :class:`LossTerms`: per-token negative log-likelihoods plus
optional token weights (DFT) and sample weights (CADFT). :func:`reduce` applies the mask and the
weights and divides by a token count given by the caller. The engine passes the number of
supervised tokens in the *whole* optimizer step (all micro-batches, all ranks), so summing the
micro-batch losses reproduces the full-batch loss exactly: gradient accumulation is exact, and
8 micro-batches of 1 give the same gradient as 4 of 2 or 1 of 8.

The contract between the loop and a loss is :class:`mixtune.losses.base.Loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mixtune.data.tokenize import IGNORE

if TYPE_CHECKING:
    from mixtune.engine.state import TrainState


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


def micro_batch_scales(state: TrainState, batches: list[dict]) -> list[float]:
    """Sample weights turning the step-token normaliser into verl's per-micro-batch mean.

    The loop computes ``sum / n_step * world`` per micro-batch and DDP averages over ranks; verl
    computes ``sum / n_mb / n_micro`` and DDP averages. Weight ``n_step / (world * n_micro *
    n_mb)`` makes the first equal the second.
    """
    counts = [float((b["labels"][:, 1:] != IGNORE).sum()) for b in batches]  # host sync, tiny
    total = torch.tensor(sum(counts), dtype=torch.float64, device=state.acc.device)
    if state.world > 1:
        total = state.acc.reduce(total, reduction="sum")
    n_step = float(total)
    return [n_step / (state.world * len(batches) * max(c, 1.0)) for c in counts]
