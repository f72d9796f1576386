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
"""

from __future__ import annotations

from dataclasses import dataclass

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
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    mask = shift_labels != IGNORE
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(shift_labels.shape)
    return nll, mask


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


LOSSES: dict[str, type] = {"sft": SFT}


def build_loss(cfg) -> object:
    """Instantiate the loss named in ``cfg`` (a :class:`mixtune.config.MethodConfig`)."""
    from mixtune.config import method_options

    cls = LOSSES[cfg.name]
    return cls(method_options(cfg, LOSSES, "loss"))
