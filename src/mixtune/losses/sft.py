"""SFT: token cross-entropy on response tokens (``loss.name: sft``)."""

from __future__ import annotations

import torch

from mixtune.losses.base import Loss
from mixtune.losses.core import LossTerms, token_losses


def sft(logits: torch.Tensor, labels: torch.Tensor) -> LossTerms:
    """Standard supervised fine-tuning: token cross-entropy on response tokens."""
    nll, mask = token_losses(logits, labels)
    return LossTerms(nll, mask)


class SFT(Loss):
    """Cross-entropy on response tokens (``loss.name: sft``); no state, no hooks."""

    def __init__(self, options=None):
        pass

    def terms(self, nll: torch.Tensor, mask: torch.Tensor, extra=None) -> LossTerms:
        return LossTerms(nll, mask)
