"""A toy mixer and a toy loss, defined outside the package: a new method is its own file plus
one registry line (tests/test_new_methods.py registers these and trains with them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixtune.losses.core import LossTerms, token_losses
from mixtune.mixers.base import Steps


@dataclass(frozen=True)
class ToyMixerConfig:
    every: int = 2
    """Update interval in steps."""


class ToyMixer:
    """Puts each dataset's weight in proportion to its domain's current evaluation loss (the
    dataset named like the domain): the worse a domain, the more of its data."""

    Config = ToyMixerConfig
    requires = frozenset({"evaluate"})

    def __init__(self, options: ToyMixerConfig, datasets, domains, seed):
        self.o, self.names, self.updates = options, [d.name for d in datasets], 0

    def update_steps(self, max_steps):
        return Steps.every(self.o.every, max_steps)

    def propose(self, ctx):
        self.updates += 1
        ev = ctx.evaluate()
        loss = np.array([ev[n]["loss"] for n in self.names])
        ctx.log("updates", self.updates)
        return loss / loss.sum()

    def state_dict(self):
        return {"updates": self.updates}

    def load_state_dict(self, state):
        self.updates = state["updates"]


@dataclass(frozen=True)
class ToyLossConfig:
    scale: float = 1.0
    """Multiplies the token cross-entropy (0: nothing is learned)."""


class ToyLoss:
    """Token cross-entropy times a constant; counts the optimizer steps it has seen."""

    Config = ToyLossConfig

    def __init__(self, options: ToyLossConfig):
        self.scale, self.steps, self.resumed = options.scale, 0, 0

    def __call__(self, logits, labels, extra=None) -> LossTerms:
        nll, mask = token_losses(logits, labels)
        return LossTerms(nll * self.scale, mask)

    def prepare(self, state, batches):
        return [None] * len(batches)

    def after_step(self, state):
        self.steps += 1

    def diagnostics(self, state):
        return {"steps": self.steps}

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]

    def on_resume(self, state):
        self.resumed += 1
