"""Static mixtures: weights fixed for the whole run (the baselines every method is compared to).

- ``uniform``: every dataset equally likely.
- ``proportional``: by size (examples, or supervised tokens with ``by: tokens``); every example
  is seen about equally often ("full coverage").
- ``temperature``: p ∝ n^(1/τ) — τ=1 is proportional, τ→∞ uniform.
- ``fixed``: the user's shares by dataset name, e.g. ``weights: {math: 2, chat: 1}`` (ratios are
  normalised; names not listed get 0; an unknown name is a config error at load).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from mixtune import simplex
from mixtune.errors import ConfigError
from mixtune.mixers.base import DatasetInfo, MixContext, Steps, Weights


def _sizes(datasets: list[DatasetInfo], by: str) -> np.ndarray:
    return np.array([d.tokens if by == "tokens" else d.size for d in datasets], np.float64)


class Uniform:
    Config = None

    def __init__(self, options, datasets: list[DatasetInfo], domains, seed: int):
        self.w = np.full(len(datasets), 1.0 / len(datasets))

    def update_steps(self, max_steps: int) -> Steps:
        return Steps((0,))

    def propose(self, ctx: MixContext) -> Weights:
        return self.w

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass(frozen=True)
class ProportionalConfig:
    by: Literal["examples", "tokens"] = "examples"
    """Size measure: number of examples or of supervised tokens."""


class Proportional(Uniform):
    Config = ProportionalConfig

    def __init__(self, options: ProportionalConfig, datasets, domains, seed: int):
        n = _sizes(datasets, options.by)
        self.w = n / n.sum()


@dataclass(frozen=True)
class TemperatureConfig:
    tau: float = 2.0
    """Temperature τ > 0: p ∝ n^(1/τ)."""
    by: Literal["examples", "tokens"] = "examples"

    def __post_init__(self):
        if not self.tau > 0:
            raise ConfigError(f"mixer.tau: must be > 0, got {self.tau}")


class Temperature(Uniform):
    Config = TemperatureConfig

    def __init__(self, options: TemperatureConfig, datasets, domains, seed: int):
        n = _sizes(datasets, options.by) ** (1.0 / options.tau)
        self.w = n / n.sum()


@dataclass(frozen=True)
class FixedConfig:
    weights: dict
    """Shares by dataset name (normalised to sum to 1)."""


class Fixed(Uniform):
    Config = FixedConfig

    @staticmethod
    def check_run(options: FixedConfig, cfg) -> None:
        """Every name in ``weights`` is a training dataset of the run (checked at config load)."""
        names = [d.name for d in cfg.datasets]
        for k in options.weights:
            if k not in names:
                raise ConfigError(f"mixer.weights.{k}: unknown dataset name; datasets are {names}")

    def __init__(self, options: FixedConfig, datasets, domains, seed: int):
        self.w = simplex.normalize(
            options.weights, [d.name for d in datasets], what="mixer.weights"
        )
