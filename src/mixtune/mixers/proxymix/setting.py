"""The ``mixtune proxymix learn|run`` config: a continual config plus ProxyMix's own sections.

The file is a continual config (:mod:`mixtune.continual.config`: ``stages``, buffers, safety,
``model``, ``train``, ``mixer``, ...) with two more sections: ``learn`` (REINFORCE on the proxy,
:mod:`mixtune.mixers.proxymix.learn`) and ``transfer`` (the pre-transfer check,
:mod:`mixtune.mixers.proxymix.transfer`). Without a ``mixer`` section the stages run ProxyMix
with fixed replay. The proxy is this config with ``learn.proxy`` deep-merged over it
(:func:`proxy_setting`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mixtune import schema
from mixtune.config import MethodConfig
from mixtune.continual import config as continual_config
from mixtune.continual.config import ContinualConfig
from mixtune.errors import ConfigError


@dataclass(frozen=True)
class LearnConfig:
    episodes: int = 20
    """RL episodes; one episode = one continual run of the proxy over one sequence."""
    proxy: dict = field(default_factory=dict)
    """Overrides of this config for the proxy, deep-merged (e.g. ``{model: {config: ...}}``)."""
    output_dir: str | None = None
    """Learner directory (null: ``<output_dir>/learn``); holds learner state for resuming."""
    controller: str | None = None
    """Where the frozen controller is written (null: ``<learn dir>/controller.pt``)."""
    algorithm: Literal["reinforce"] = "reinforce"
    """REINFORCE with a baseline (PPO is not implemented)."""
    lr: float = 1e-3
    sigma: float = 0.5
    """Std of the Gaussian noise on the controller's logits while exploring."""
    gamma: float = 0.99
    baseline: Literal["moving_average", "none"] = "moving_average"
    baseline_momentum: float = 0.8
    """Per-decision moving-average baseline of the return (weight of the old value)."""
    normalize_advantages: bool = True
    lambda_forget: float = 1.0
    lambda_safety: float = 1.0
    terminal_weight: float = 1.0
    """Weight of the end-of-sequence bonus AA - lambda_F F + lambda_S safety."""
    lambda_F: float = 1.0
    lambda_S: float = 1.0
    terminal_metric: Literal["accuracy", "loss"] = "accuracy"
    hidden: int = 64
    layers: int = 2
    vary_data_seed: bool = False
    """Give every episode its own data order and buffers too (default: the same data for every
    episode, so returns differ by the policy's actions only -- common random numbers)."""
    keep_episodes: bool = False
    """Keep every episode's stage runs (default: delete them once the episode is recorded)."""

    def __post_init__(self):
        schema.check(self.episodes >= 1, "learn.episodes", "must be >= 1", self.episodes)
        schema.check(self.lr > 0, "learn.lr", "must be > 0", self.lr)
        schema.check(self.sigma > 0, "learn.sigma", "must be > 0", self.sigma)
        schema.check(0 <= self.gamma <= 1, "learn.gamma", "must be in [0, 1]", self.gamma)
        schema.check(
            0 <= self.baseline_momentum < 1,
            "learn.baseline_momentum",
            "must be in [0, 1)",
            self.baseline_momentum,
        )
        schema.check(
            self.hidden >= 1 and self.layers >= 1,
            "learn.hidden/layers",
            "must be >= 1",
            (self.hidden, self.layers),
        )


@dataclass(frozen=True)
class TransferConfig:
    check: bool = True
    """Before a controller run, compare proxy and target vulnerability rankings (P9)."""
    probe_steps: int = 20
    """Steps per stage of the short fixed-replay probe run on the target."""
    statistic: Literal["spearman", "kendall"] = "spearman"
    threshold: float = 0.6
    """Below this rank correlation: warn and fall back to fixed replay."""

    def __post_init__(self):
        schema.check(
            self.probe_steps >= 1, "transfer.probe_steps", "must be >= 1", self.probe_steps
        )
        schema.check(
            -1 <= self.threshold <= 1, "transfer.threshold", "must be in [-1, 1]", self.threshold
        )


@dataclass(frozen=True)
class ProxyMixSetting(ContinualConfig):
    """A continual config with ProxyMix's ``learn`` and ``transfer`` sections."""

    mixer: MethodConfig = field(
        default_factory=lambda: MethodConfig("proxymix", {"policy": "fixed"})
    )
    """The per-stage mixer (default: ProxyMix with fixed replay); any registered mixer works."""
    learn: LearnConfig = field(default_factory=LearnConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)


def load(path: str | Path | None = None, overrides=(), data: dict | None = None) -> ProxyMixSetting:
    """Read a ``mixtune proxymix`` YAML (or ``data``), apply ``key=value`` overrides, validate."""
    return continual_config.load(path, overrides, data, cls=ProxyMixSetting)


def proxy_setting(px: ProxyMixSetting) -> ProxyMixSetting:
    """The config of the proxy: ``learn.proxy`` deep-merged over this one."""
    raw = schema.to_dict(px)
    _merge(raw, schema.copy_raw(px.learn.proxy))
    raw["learn"]["proxy"] = {}
    try:
        return continual_config.from_dict(raw, ProxyMixSetting)
    except ConfigError as e:
        raise ConfigError(f"learn.proxy: {e}") from None


def _merge(base: dict, over: dict) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
