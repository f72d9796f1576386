"""Continual configuration: a task sequence, replay buffers, evaluation, learning and transfer.

A continual config is YAML like a run config, with ``stages:`` (the tasks, trained one after
another) instead of ``datasets:``. :func:`stage_config` expands it into one ordinary
:class:`mixtune.config.RunConfig` per stage: the current task, a buffer (a seeded subset of
``buffer_size`` training examples) of every earlier task, the optional always-available safety
buffer, and evaluation domains for every task seen so far plus the safety domain. Future tasks
never appear in a stage's config, which is what "masked" means here.

``learn.proxy`` and ``transfer`` hold the ProxyMix settings (docs/proxymix.md); ``load`` reads
the file, applies ``key=value`` overrides, and validates like :func:`mixtune.config.load`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mixtune import config as C
from mixtune.config import (
    DatasetConfig,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)
from mixtune.errors import ConfigError

SAFETY_EVAL = "safety"
SAFETY_BUFFER = "safety_replay"


@dataclass(frozen=True)
class TaskConfig:
    name: str
    """Task name (also the name of its buffer dataset and of its evaluation domain)."""
    path: str
    """Training source: a file, a Hugging Face dataset or ``builtin:<domain>``."""
    split: str = "train"
    subset: str | None = None
    format: Literal["auto", "messages", "prompt_response", "instruction", "text"] = "auto"
    fields: dict | None = None
    max_examples: int | None = None
    """Training examples used while this task is the current one (null: all)."""
    eval: dict | None = None
    """Evaluation domain (``evals[]`` keys except ``name``); null = the ``eval`` split of a
    built-in domain, or 10% held out of the training data otherwise."""
    steps: int | None = None
    """Optimizer steps of this task's stage (null: ``steps_per_stage``)."""

    def __post_init__(self):
        C._check_name(self.name, "stages[].name")
        C._check(
            self.steps is None or self.steps >= 1,
            f"stages.{self.name}.steps",
            "must be >= 1 or null",
            self.steps,
        )


@dataclass(frozen=True)
class WarmupConfig:
    steps: int = 200
    """Steps of the one-off pre-training that gives a from-scratch model skills to forget."""
    datasets: tuple[DatasetConfig, ...] = ()
    train: dict | None = None
    """Overrides of the ``train`` section for the warm-up, e.g. ``{lr: 3e-3, schedule:
    cosine}`` (null: the stages' settings)."""
    output_dir: str | None = None
    """Cache directory (null: ``<output_dir>/warmup``); reused when it holds a finished run."""


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
        C._check(self.episodes >= 1, "learn.episodes", "must be >= 1", self.episodes)
        C._check(self.lr > 0, "learn.lr", "must be > 0", self.lr)
        C._check(self.sigma > 0, "learn.sigma", "must be > 0", self.sigma)
        C._check(0 <= self.gamma <= 1, "learn.gamma", "must be in [0, 1]", self.gamma)
        C._check(
            0 <= self.baseline_momentum < 1,
            "learn.baseline_momentum",
            "must be in [0, 1)",
            self.baseline_momentum,
        )
        C._check(
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
        C._check(self.probe_steps >= 1, "transfer.probe_steps", "must be >= 1", self.probe_steps)
        C._check(
            -1 <= self.threshold <= 1, "transfer.threshold", "must be in [-1, 1]", self.threshold
        )


@dataclass(frozen=True)
class ContinualConfig:
    stages: tuple[TaskConfig, ...]
    """The tasks, in training order."""
    output_dir: str = "runs/continual"
    seed: int = 0
    steps_per_stage: int = 100
    sequences: tuple[tuple[str, ...], ...] = ()
    """Task orders to run/learn on (names of ``stages``); empty = the ``stages`` order."""
    buffer_size: int = 200
    """Examples in each earlier task's replay buffer (a seeded subset of its training data)."""
    safety_eval: dict | None = None
    """The safety evaluation domain (``evals[]`` keys except ``name``), e.g.
    ``{path: "builtin:safety", split: eval}``; its accuracy is the safety score."""
    safety_buffer: dict | None = None
    """An always-accessible alignment buffer (``datasets[]`` keys except ``name``)."""
    accuracy: bool = True
    """Measure accuracy (greedy generation) after each stage; false = losses only (cheaper:
    average accuracy, forgetting and safety are then null; loss-based metrics remain)."""
    eval_batches: int = 4
    eval_batch_size: int = 8
    max_new_tokens: int = 16
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: MethodConfig = field(default_factory=lambda: MethodConfig("sft"))
    mixer: MethodConfig = field(
        default_factory=lambda: MethodConfig("proxymix", {"policy": "fixed"})
    )
    """The per-stage mixer over [current task, buffers]; ``proxymix`` gets stage context."""
    warmup: WarmupConfig | None = None
    learn: LearnConfig = field(default_factory=LearnConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    keep_checkpoints: bool = False
    """Keep each finished stage's checkpoints (its ``final/`` model is always kept)."""
    progress: bool = False

    def __post_init__(self):
        if not self.stages:
            raise ConfigError("stages: at least one task is required")
        names = [t.name for t in self.stages]
        C._unique(names, "stages")
        for reserved in (SAFETY_EVAL, SAFETY_BUFFER):
            if reserved in names:
                raise ConfigError(f"stages: '{reserved}' is reserved; rename that task")
        for i, seq in enumerate(self.sequences):
            if sorted(seq) != sorted(set(seq)) or not set(seq) <= set(names) or not seq:
                raise ConfigError(
                    f"sequences[{i}]: must list distinct task names from {names}, got {list(seq)}"
                )
        C._check(self.steps_per_stage >= 1, "steps_per_stage", "must be >= 1", self.steps_per_stage)
        C._check(self.buffer_size >= 1, "buffer_size", "must be >= 1", self.buffer_size)
        C._check(self.eval_batches >= 1, "eval_batches", "must be >= 1", self.eval_batches)
        if self.model.lora.enabled:
            raise ConfigError(
                "model.lora: continual runs chain full models between stages; "
                "LoRA is not supported here (set model.lora.enabled: false)"
            )

    def orders(self) -> list[tuple[str, ...]]:
        return list(self.sequences) or [tuple(t.name for t in self.stages)]

    def task(self, name: str) -> TaskConfig:
        return next(t for t in self.stages if t.name == name)


# --------------------------------------------------------------------------------------------


def load(path: str | Path | None = None, overrides=(), data: dict | None = None) -> ContinualConfig:
    """Read a continual YAML (or ``data``), apply ``key=value`` overrides, validate."""
    raw = C._deepcopy(data if data is not None else C.read_yaml(path))
    for item in overrides:
        C.apply_override(raw, item)
    return from_dict(raw)


def from_dict(raw: dict) -> ContinualConfig:
    if "datasets" in raw and "stages" not in raw:
        raise ConfigError(
            "stages: a continual config lists its tasks under 'stages:', not 'datasets:'"
        )
    cc = C.build(ContinualConfig, raw, "")
    stage_config(cc, cc.orders()[0], 0, MethodConfig(cc.mixer.name, dict(cc.mixer.params)))
    return cc


def is_continual(path: str | Path) -> bool:
    """Whether a YAML file is a continual config (has a top-level ``stages:``)."""
    return "stages" in C.read_yaml(path)


def proxy_config(cc: ContinualConfig) -> ContinualConfig:
    """The config of the proxy: ``learn.proxy`` deep-merged over this one."""
    raw = C.to_dict(cc)
    _merge(raw, C._deepcopy(cc.learn.proxy))
    raw["learn"]["proxy"] = {}
    try:
        return from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"learn.proxy: {e}") from None


def stage_config(
    cc: ContinualConfig,
    order,
    s: int,
    mixer: MethodConfig,
    model_path: str | None = None,
    output_dir: str | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
) -> RunConfig:
    """The ordinary run config of stage ``s`` (0-based) of the sequence ``order``."""
    tasks = [cc.task(n) for n in order]
    cur = tasks[s]
    datasets = [_dataset(cur, cur.max_examples)]
    datasets += [_dataset(t, cc.buffer_size) for t in tasks[:s]]
    evals = [_eval(cc, t) for t in tasks[: s + 1]]
    if cc.safety_buffer is not None:
        datasets.append(
            C.build(DatasetConfig, {"name": SAFETY_BUFFER, **cc.safety_buffer}, "safety_buffer")
        )
    if cc.safety_eval is not None:
        spec = {
            "batches": cc.eval_batches,
            "batch_size": cc.eval_batch_size,
            "max_new_tokens": cc.max_new_tokens,
            "role": "constraint",
            **cc.safety_eval,
            "name": SAFETY_EVAL,
        }
        evals.append(C.build(EvalConfig, spec, "safety_eval"))
    model = cc.model
    if model_path is not None:  # later stages start from the previous stage's final model
        model = dataclasses.replace(
            model,
            name_or_path=model_path,
            config=None,
            tokenizer=model.tokenizer or cc.model.name_or_path,
        )
    out = output_dir or str(Path(cc.output_dir) / f"stage-{s + 1:02d}-{cur.name}")
    cfg = RunConfig(
        output_dir=out,
        seed=cc.seed if seed is None else seed,
        max_steps=max_steps or cur.steps or cc.steps_per_stage,
        resume="auto",
        model=model,
        datasets=tuple(datasets),
        evals=tuple(evals),
        mixer=mixer,
        loss=cc.loss,
        train=cc.train,
        progress=cc.progress,
    )
    C._validate_methods(cfg)
    return cfg


def _dataset(t: TaskConfig, limit: int | None) -> DatasetConfig:
    return DatasetConfig(
        name=t.name,
        path=t.path,
        split=t.split,
        subset=t.subset,
        format=t.format,
        fields=t.fields,
        max_examples=limit,
    )


def _eval(cc: ContinualConfig, t: TaskConfig) -> EvalConfig:
    if t.eval is not None:
        spec = dict(t.eval)
    elif t.path.startswith("builtin:"):
        spec = {"path": t.path, "split": "eval"}
    else:
        spec = {"from_dataset": t.name, "holdout": 0.1}
    spec = {
        "batches": cc.eval_batches,
        "batch_size": cc.eval_batch_size,
        "max_new_tokens": cc.max_new_tokens,
        "role": "target",
        **spec,
        "name": t.name,
    }
    return C.build(EvalConfig, spec, f"stages.{t.name}.eval")


def _merge(base: dict, over: dict) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
