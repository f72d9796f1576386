"""Continual configuration: a task sequence, its replay buffers and its evaluation.

A continual config is YAML like a run config, with ``stages:`` (the tasks, trained one after
another) instead of ``datasets:``. :func:`mixtune.continual.stages.stage_config` expands it into
one ordinary :class:`mixtune.config.RunConfig` per stage. ``load`` reads the file, applies
``key=value`` overrides, and validates like :func:`mixtune.config.load`; a method that runs on
stage sequences may extend :class:`ContinualConfig` with sections of its own and load its
subclass through the same ``load``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mixtune import rawconfig, schema
from mixtune.config import DatasetConfig, MethodConfig, ModelConfig, TrainConfig
from mixtune.continual.stages import SAFETY_BUFFER, SAFETY_EVAL, stage_config
from mixtune.errors import ConfigError
from mixtune.schema import DEFAULT_METHODS


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
        schema.check_name(self.name, "stages[].name")
        schema.check(
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
    loss: MethodConfig = field(default_factory=lambda: MethodConfig(DEFAULT_METHODS["loss"]))
    mixer: MethodConfig = field(default_factory=lambda: MethodConfig(DEFAULT_METHODS["mixer"]))
    """The per-stage mixer over [current task, buffers]: any registered mixer; one that
    declares :class:`mixtune.continual.hooks.StageAware` is also told its stage."""
    warmup: WarmupConfig | None = None
    keep_checkpoints: bool = False
    """Keep each finished stage's checkpoints (its ``final/`` model is always kept)."""
    progress: bool = False

    def __post_init__(self):
        if not self.stages:
            raise ConfigError("stages: at least one task is required")
        names = [t.name for t in self.stages]
        schema.unique(names, "stages")
        for reserved in (SAFETY_EVAL, SAFETY_BUFFER):
            if reserved in names:
                raise ConfigError(f"stages: '{reserved}' is reserved; rename that task")
        for i, seq in enumerate(self.sequences):
            if sorted(seq) != sorted(set(seq)) or not set(seq) <= set(names) or not seq:
                raise ConfigError(
                    f"sequences[{i}]: must list distinct task names from {names}, got {list(seq)}"
                )
        schema.check(
            self.steps_per_stage >= 1, "steps_per_stage", "must be >= 1", self.steps_per_stage
        )
        schema.check(self.buffer_size >= 1, "buffer_size", "must be >= 1", self.buffer_size)
        schema.check(self.eval_batches >= 1, "eval_batches", "must be >= 1", self.eval_batches)
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


def load(
    path: str | Path | None = None,
    overrides=(),
    data: dict | None = None,
    cls: type[ContinualConfig] | None = None,
) -> ContinualConfig:
    """Read a continual YAML (or ``data``), apply ``key=value`` overrides, validate into
    ``cls`` (:class:`ContinualConfig` or a subclass of it)."""
    raw = schema.copy_raw(data if data is not None else rawconfig.read_yaml(path))
    for item in overrides:
        rawconfig.apply_override(raw, item)
    return from_dict(raw, cls or ContinualConfig)


def from_dict(raw: dict, cls: type[ContinualConfig] | None = None) -> ContinualConfig:
    """Build and validate ``cls`` (default :class:`ContinualConfig`) from plain data; the first
    stage's run config is expanded once, so a bad mixer option fails here."""
    if "datasets" in raw and "stages" not in raw:
        raise ConfigError(
            "stages: a continual config lists its tasks under 'stages:', not 'datasets:'"
        )
    cc = schema.build(cls or ContinualConfig, raw, "")
    stage_config(cc, cc.orders()[0], 0, MethodConfig(cc.mixer.name, dict(cc.mixer.params)))
    return cc
