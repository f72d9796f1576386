"""Test-only helpers shared by tests and the multi-process worker."""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _ChaseConfig:
    rate: float = 0.5


class ChaseLoss:
    """Test-only mixer: moves weight toward the dataset with the highest recent train loss.

    Its weights depend on the training history, so resume must restore that history exactly.
    """

    Config = _ChaseConfig

    def __init__(self, options, datasets, domains, seed):
        self.rate = options.rate
        self.calls = 0

    def update_steps(self, max_steps):
        return list(range(0, max_steps, 2))

    def propose(self, ctx):
        self.calls += 1
        losses = np.array([ctx.train_losses.get(d.name, 0.0) for d in ctx.datasets])
        target = np.eye(len(losses))[int(np.argmax(losses))]
        w = (1 - self.rate) * ctx.weights + self.rate * target
        ctx.log("calls", self.calls)
        return w / w.sum()

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]
