"""The contract between the training loop and a loss.

The loop (:mod:`mixtune.engine.loop`) calls every hook below directly, at fixed points of a run:

- ``prepare(state, batches)``: once per optimizer step, after this rank's micro-batches are
  collated and before any forward; returns one ``extra`` per micro-batch (CADFT's z-scores over
  the whole global batch, DFT's per-micro-batch normaliser). Probing mixers' branch steps run
  it too, so it must start each step afresh.
- ``terms(nll, mask, extra)``: per micro-batch, under autocast, on the per-token NLL and mask
  of :func:`~mixtune.losses.core.token_losses`; returns :class:`~mixtune.losses.core.LossTerms`,
  which the loop reduces with the step's global token count
  (:func:`~mixtune.losses.core.reduce`). The loop computes the NLL with or without the full
  logits (:mod:`mixtune.losses.logits`, ``train.logits``).
- ``__call__(logits, labels, extra)``: the same from the full logits; :class:`Loss` defines it
  as ``terms`` of their token losses. A loss that needs the logits themselves overrides it
  instead of ``terms`` (and then always gets the full logits).
- ``after_step(state)``: after each real optimizer step (never after a branch step): commit
  what the step measured, act on it (CADFT's rewriting).
- ``diagnostics(state)``: at log steps; the dict is logged under ``"loss"`` when not empty.
  It may all-reduce, so every rank calls it.
- ``state_dict()`` / ``load_state_dict(state)``: written to and read from each checkpoint
  (``loss.pt``) on the main process.
- ``on_resume(state)``: once, after a checkpoint is loaded and before the first resumed step
  (CADFT re-applies its restored rewrites to the training data there).

``state`` is the run's :class:`~mixtune.engine.state.TrainState`. :class:`Loss` gives every
hook a body that does nothing: this class is the one place where those defaults live, and a
loss overrides the hooks it uses. A class that does not inherit from it works as well if it
defines all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mixtune.losses.core import LossTerms, token_losses

if TYPE_CHECKING:
    from mixtune.engine.state import TrainState


class Loss:
    """A training objective: per-token terms plus the hooks the loop calls (no-ops here)."""

    Config = None
    """The options dataclass (``None``: the loss takes none); see :mod:`mixtune.registry`."""

    def terms(self, nll: torch.Tensor, mask: torch.Tensor, extra=None) -> LossTerms:
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, extra=None) -> LossTerms:
        return self.terms(*token_losses(logits, labels), extra)

    def prepare(self, state: TrainState, batches: list[dict]) -> list[dict | None]:
        return [None] * len(batches)

    def after_step(self, state: TrainState) -> None:
        pass

    def diagnostics(self, state: TrainState) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def on_resume(self, state: TrainState) -> None:
        pass
