"""The mixer contract: what a mixer sees and what it must provide.

A mixer owns the mixture weights; the loop owns the step. The loop calls ``propose(ctx)`` after
each step listed in ``update_steps(max_steps)`` (always including 0, before any training) and
hands the result to the sampler. A mixer sees numbers and narrow callables, never the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

Weights = np.ndarray  # (K,), on the simplex, train-dataset order


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    size: int  # examples available for training
    tokens: int  # supervised tokens over all examples


@dataclass(frozen=True)
class DomainInfo:
    name: str
    role: str  # target | constraint | monitor
    metric: str  # loss | accuracy
    reference: float | None  # given in the config, or None (measure at step 0)


@dataclass
class LookaheadResult:
    pre: np.ndarray  # (B,) per-example loss before the virtual step
    post: np.ndarray  # (B,) on the same examples after it
    seconds: float


@dataclass
class MixContext:
    step: int
    max_steps: int
    datasets: list[DatasetInfo]
    domains: list[DomainInfo]
    weights: Weights  # current
    train_losses: dict[str, float]  # mean token loss per dataset since the last update (all ranks)
    evaluate: Callable[..., dict[str, dict[str, float]]]
    """``evaluate(n_batches=None)`` -> {domain: {"loss": .., "accuracy": ..}} at the current
    parameters (reuses the scheduled evaluation of this step when it has enough batches)."""
    probe: Callable[..., dict[str, dict[str, float]]]
    """``probe(j, steps, n_batches)``: train ``steps`` steps on dataset j only, evaluate,
    restore."""
    lookahead: Callable[..., LookaheadResult]
    """``lookahead(j, optimizer="sgd"|"adam")``: one virtual step on a batch of dataset j."""
    log: Callable[[str, object], None]
    """``log(key, value)`` adds a diagnostic to this step's metrics record (under "mixer")."""
    extra: dict = field(default_factory=dict)
    losses: Callable[..., np.ndarray] | None = None
    """``losses(j, batch_size=None, key=None)``: per-example loss, forward only, on the batch
    ``lookahead`` would draw for the same arguments (no step, nothing changes)."""
    grad_alignment: Callable[..., np.ndarray] | None = None
    """``grad_alignment(n_batches=None)`` -> (M, K) slopes −lr·⟨g_i, d_j⟩: g_i the gradient of
    domain i's evaluation loss, d_j the Adam direction of a step on a batch of dataset j
    (DynaMiCS's gradient-alignment baseline; nothing changes)."""


class Mixer(Protocol):
    def update_steps(self, max_steps: int) -> Sequence[int]: ...

    def propose(self, ctx: MixContext) -> Weights: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
