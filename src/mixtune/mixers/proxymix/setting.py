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
    algorithm: Literal["reinforce", "ppo"] = "reinforce"
    """REINFORCE with a baseline, or (a deviation) clipped PPO over each update's batch."""
    episodes_per_update: int = 1
    """Episodes per policy update (1: the faithful one-episode step). > 1 is a deviation for
    variance reduction: the episodes of an update share one data seed (common random numbers)
    and one step is taken on their mean loss. ``episodes`` must be a multiple of it."""
    antithetic: bool = False
    """Deviation: the episodes of an update come in pairs with mirrored exploration noise
    (eps, -eps) on the same order and data (needs an even ``episodes_per_update``)."""
    normalize_rewards: bool = False
    """Deviation: divide rewards by the running std of the episode returns."""
    ppo_epochs: int = 4
    """Algorithm ppo: optimisation steps on each update's batch."""
    ppo_clip: float = 0.2
    """Algorithm ppo: clip range of the probability ratio."""
    eval_every: int = 0
    """Evaluate the greedy policy (no exploration) on held-out episodes before the first
    update, every this many updates and after the last (0: never); ``greedy.json/.csv/.png``."""
    eval_episodes: int = 6
    """Held-out episodes per greedy evaluation (orders rotate; data seeds never trained on)."""
    lr: float = 1e-3
    sigma: float = 0.5
    """Std of the Gaussian noise on the controller's logits while exploring."""
    gamma: float = 0.99
    baseline: Literal["moving_average", "batch", "none"] = "moving_average"
    """moving_average (per sequence and decision index, faithful); batch (a deviation: the mean
    return of the update's episodes of the same sequence, which share state and data; needs
    ``episodes_per_update`` >= 2); none (the episode's mean return)."""
    baseline_momentum: float = 0.8
    """Per-decision moving-average baseline of the return (weight of the old value)."""
    normalize_advantages: bool = True
    lambda_forget: float = 1.0
    lambda_safety: float = 1.0
    terminal_weight: float = 1.0
    """Weight of the end-of-sequence bonus AA - lambda_F F + lambda_S safety."""
    lambda_F: float = 1.0
    lambda_S: float = 1.0
    terminal_metric: Literal["accuracy", "loss", "loss_learned"] = "accuracy"
    """What the end-of-sequence bonus is measured in. accuracy (faithful): AA - lambda_F F +
    lambda_S safety. loss (for proxies whose accuracies stay near zero): -(mean final loss of
    each task / its loss right after its stage - 1) - lambda_F (loss forgetting) - lambda_S
    (safety loss ratio - 1); its AA term measures retention only, so a task barely learned
    scores as well as one learned well. loss_learned (a deviation, issue 21): the AA term is
    mean_i (1 - final loss of task i / its loss before its stage), i.e. learning and
    retention, as AA credits both; the rest as loss."""
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
        B = self.episodes_per_update
        schema.check(B >= 1, "learn.episodes_per_update", "must be >= 1", B)
        schema.check(
            self.episodes % B == 0,
            "learn.episodes",
            f"must be a multiple of learn.episodes_per_update ({B})",
            self.episodes,
        )
        schema.check(
            not self.antithetic or B % 2 == 0,
            "learn.antithetic",
            "needs an even learn.episodes_per_update",
            B,
        )
        schema.check(
            self.baseline != "batch" or B >= 2,
            "learn.baseline",
            "batch needs learn.episodes_per_update >= 2",
            B,
        )
        schema.check(self.ppo_epochs >= 1, "learn.ppo_epochs", "must be >= 1", self.ppo_epochs)
        schema.check(0 < self.ppo_clip < 1, "learn.ppo_clip", "must be in (0, 1)", self.ppo_clip)
        schema.check(self.eval_every >= 0, "learn.eval_every", "must be >= 0", self.eval_every)
        schema.check(
            self.eval_episodes >= 2, "learn.eval_episodes", "must be >= 2", self.eval_episodes
        )
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
