"""The stage hooks: what the continual driver tells a mixer about the sequence, and gets back.

Every stage is an ordinary run, so any mixer runs in one as it would anywhere. A mixer that
needs to know where it is in the sequence -- which dataset is the current task, when each
buffer's task was learned, the state it carried out of the previous stage -- declares so by
subclassing :class:`StageAware`. That base is an interface only (every hook is abstract, no
behaviour is inherited), so the declaration is explicit and the driver calls the hooks directly:

    hooks = stage_hooks(trainer.mixer)        # the mixer itself, or a no-op for any other mixer
    hooks.begin_stage(StageContext(...))      # before the stage trains; a resumed stage then
    trainer.run()                             #   loads the mixer's checkpointed state over it
    outcome = hooks.end_stage(StageEnd(...))  # after the stage's final evaluation
    # outcome.carry -> the next stage's StageContext.carry; outcome.trajectory -> stage.json

The context is runtime state, not configuration: a stage's ``config.yaml`` holds the user's
mixer options only.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageContext:
    """Where a stage sits in its sequence (the defaults: a single stage, nothing carried)."""

    current: str
    """The current task's training dataset; every other dataset of the stage is a buffer."""
    index: int = 0
    """This stage, 0-based."""
    n_stages: int = 1
    """Stages in the sequence."""
    learned: dict[str, int] = field(default_factory=dict)
    """{earlier task: the stage in which it was learned}; each is a buffer dataset here."""
    safety_buffer: str | None = None
    """The always-available safety buffer's dataset, if the sequence has one."""
    safety_domain: str | None = None
    """The evaluation domain whose accuracy is the safety score (None: the mixer's default);
    it is absent from the stage when the sequence has no safety evaluation."""
    carry: dict = field(default_factory=dict)
    """What this mixer's :meth:`StageAware.end_stage` returned after the previous stage
    (``{}`` at the first): plain JSON data, saved in each stage's ``stage.json``."""

    def __post_init__(self):
        if not 0 <= self.index < self.n_stages:
            raise ValueError(
                f"stage context: index must be in [0, n_stages={self.n_stages}), got {self.index}"
            )


@dataclass(frozen=True)
class StageEnd:
    """What the driver measured when a stage finished training."""

    max_steps: int
    """The stage's step budget."""
    losses: dict[str, float]
    """Every domain's loss after the stage, over all its evaluation batches."""
    evaluate: Callable[[int], dict[str, float]]
    """``evaluate(n_batches)``: every domain's loss over its first ``n_batches`` batches,
    measured afresh (for a mixer whose references come from fewer batches than the driver's)."""


@dataclass(frozen=True)
class StageOutcome:
    """What a mixer hands back at the end of a stage."""

    carry: dict
    """State for the next stage (its :attr:`StageContext.carry`); plain JSON data."""
    trajectory: list[dict] = field(default_factory=list)
    """The mixer's per-decision observations over the stage, for the results."""


class StageAware(abc.ABC):
    """The declaration that a mixer takes part in a stage sequence, and its two hooks."""

    @abc.abstractmethod
    def begin_stage(self, stage: StageContext) -> None:
        """Called once the mixer is built, before the stage's first decision."""

    @abc.abstractmethod
    def end_stage(self, end: StageEnd) -> StageOutcome:
        """Called after the stage's final evaluation; returns what the next stage gets."""


class _Unaware(StageAware):
    """The hooks of a mixer that does not declare :class:`StageAware`: nothing to tell it,
    nothing carried."""

    def begin_stage(self, stage: StageContext) -> None:
        return None

    def end_stage(self, end: StageEnd) -> StageOutcome:
        return StageOutcome(carry={})


def stage_hooks(mixer) -> StageAware:
    """The stage hooks of ``mixer``: itself when it declares :class:`StageAware`, else no-ops."""
    return mixer if isinstance(mixer, StageAware) else _Unaware()
