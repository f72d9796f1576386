"""The mixer contract: what a mixer sees and what it must provide.

A mixer owns the mixture weights; the loop owns the step. The loop calls ``propose(ctx)`` after
each step in ``update_steps(max_steps)`` (always including 0, before any training) and
hands the result to the sampler. A mixer sees numbers and narrow callables, never the model.

``update_steps`` returns any container of ints: the loop only asks ``step in steps`` and never
iterates it, so ``max_steps`` may be huge (10**12). Return a :class:`Steps` (a ``range`` for
periodic schedules, a short explicit set otherwise): O(1) memory, and ``after(step)`` gives the
next update in O(1) / O(log n). A plain list still works for short schedules.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

Weights = np.ndarray  # (K,), on the simplex, train-dataset order


class Steps(Sequence):
    """A sorted set of update steps in O(1) memory: a ``range``, or a short explicit tuple.

    ``in`` is O(1) (range) or O(log n) (tuple) and never iterates; it equals any sequence
    with the same elements (``Steps(range(0, 9, 4)) == [0, 4, 8]``).
    """

    __slots__ = ("_s",)

    def __init__(self, steps):
        if isinstance(steps, range):
            if steps.step <= 0:
                raise ValueError(f"update steps: range step must be > 0, got {steps.step}")
            self._s = steps
        else:
            self._s = tuple(sorted({operator.index(s) for s in steps}))

    @classmethod
    def every(cls, interval: int, max_steps: int) -> Steps:
        """0, interval, 2*interval, ... below ``max_steps``."""
        return cls(range(0, max_steps, interval))

    def __contains__(self, step) -> bool:
        try:
            step = operator.index(step)  # numpy ints too; a non-int would make range iterate
        except TypeError:
            return False
        if isinstance(self._s, range):
            return step in self._s
        i = bisect.bisect_left(self._s, step)
        return i < len(self._s) and self._s[i] == step

    def after(self, step: int) -> int | None:
        """The first update step strictly after ``step``, or None."""
        s = self._s
        if isinstance(s, range):
            if not s or step < s.start:
                return s.start if s else None
            nxt = s.start + ((step - s.start) // s.step + 1) * s.step
            return nxt if nxt < s.stop else None
        i = bisect.bisect_right(s, step)
        return s[i] if i < len(s) else None

    def __len__(self) -> int:
        return len(self._s)

    def __getitem__(self, i):
        return self._s[i]

    def __iter__(self):
        return iter(self._s)

    def __eq__(self, other) -> bool:
        if isinstance(other, Steps):
            other = other._s
        if isinstance(other, range) and isinstance(self._s, range):
            return self._s == other  # O(1)
        if not isinstance(other, (Sequence, range)) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"Steps({self._s!r})"


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
    """``evaluate(n_batches=None, accuracy=True, use_cache=True, per_example=False)`` ->
    {domain: {"loss", "loss_se", "n"[, "accuracy"]}} at the current parameters over each
    domain's first ``n_batches`` batches (computed from this step's scheduled evaluation when
    it covers them: the same examples either way). ``per_example``: each entry also holds the
    per-example ``eval.domains.Scores`` under ``"scores"``. Test-split domains are never here."""
    probe: Callable[..., dict[str, dict[str, float]]]
    """``probe(j, steps, n_batches, accuracy=False, per_example=False)``: train ``steps``
    steps on dataset j only, evaluate (as ``evaluate``), restore."""
    lookahead: Callable[..., LookaheadResult]
    """``lookahead(j, optimizer="sgd"|"adam")``: one virtual step on a batch of dataset j."""
    log: Callable[[str, object], None]
    """``log(key, value)`` adds a diagnostic to this step's metrics record (under "mixer")."""
    losses: Callable[..., np.ndarray] | None = None
    """``losses(j, batch_size=None, key=None)``: per-example loss, forward only, on the batch
    ``lookahead`` would draw for the same arguments (no step, nothing changes)."""
    grad_alignment: Callable[..., np.ndarray] | None = None
    """``grad_alignment(n_batches=None)`` -> (M, K) slopes −lr·⟨g_i, d_j⟩: g_i the gradient of
    domain i's evaluation loss, d_j the Adam direction of a step on a batch of dataset j
    (DynaMiCS's gradient-alignment baseline; nothing changes)."""


class Mixer(Protocol):
    def update_steps(self, max_steps: int) -> Container[int]: ...  # e.g. Steps

    def propose(self, ctx: MixContext) -> Weights: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
