"""Run configuration: frozen dataclasses loaded from YAML, with dotted ``key=value`` overrides.

``load(path, overrides)`` reads the YAML, applies overrides such as ``train.lr=5e-5`` or
``datasets.math.max_examples=200`` (a list entry is addressed by index or by its ``name``),
then builds and validates the dataclasses below. Any problem is a :class:`ConfigError` whose
one-line message names the field and what is allowed. ``to_dict(cfg)`` gives back plain data;
the resolved config is saved as ``config.yaml`` in the run directory.

The ``mixer`` and ``loss`` sections take a ``name`` plus that method's own options; the options
are parsed once, at load, into the ``Config`` class the method declares in its own module
(``cfg.mixer.options``), found through :mod:`mixtune.registry` -- which imports a method only
when it is asked for, so this module imports no method. The same load checks that ``mixtune
train`` can give each method what it ``requires`` (:func:`train_lacks`).

Config hygiene at load, so that a habit from another tool fails at once and says what to write:
an unknown key names the closest allowed one, and the TRL / transformers spellings of mixtune's
keys (:data:`SPELLINGS`) say which key they are here; ``~`` and ``$VAR`` expand in every path
field (an unset variable is an error); a trainer in ``report_to`` must be installed; a local-looking
``model.name_or_path`` must exist. ``mixer.name=<other>`` on the command line drops the file's
options the new mixer does not take, with a notice (the same for ``loss``). ``train.epochs``
becomes a ``max_steps`` once the data is loaded (:func:`resolve_epochs`).

One file, longer than most: it is the whole user-facing schema of a run, every field with its
documentation, read top to bottom by users and by ``mixtune`` alike; split, it would scatter
one reference page over several.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import yaml

from mixtune import registry
from mixtune.errors import ConfigError
from mixtune.rawconfig import apply_override, read_yaml
from mixtune.registry import LOSSES, MIXERS
from mixtune.schema import (
    DEFAULT_METHODS,
    MethodConfig,
    build,
    check,
    check_name,
    copy_raw,
    expand_path,
    to_dict,
    unique,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Other tools' spellings

SPELLINGS: dict[str, tuple[str, str]] = {
    "learning_rate": ("train.lr", ""),
    "per_device_train_batch_size": (
        "train.micro_batch_size",
        "the examples of one forward pass on one device; but mixtune's batch is "
        "train.batch_size, the global batch of one optimizer step over all devices and "
        "accumulation steps",
    ),
    "gradient_accumulation_steps": (
        "train.batch_size",
        "mixtune sets no accumulation count: train.batch_size is the global batch of one "
        "optimizer step, train.micro_batch_size the examples of one forward pass per process, "
        "and accumulation = batch_size / (micro_batch_size x processes)",
    ),
    "num_train_epochs": ("train.epochs", ""),
    "num_epochs": ("train.epochs", "num_epochs is the axolotl name"),
    "max_seq_length": ("train.max_length", ""),
    "model_max_length": ("train.max_length", ""),
    "cutoff_len": ("train.max_length", "cutoff_len is the LLaMA-Factory name"),
    "sequence_len": ("train.max_length", "sequence_len is the axolotl name"),
    "bf16": ("model.dtype", "mixtune sets the parameter dtype: model.dtype: bfloat16"),
    "fp16": ("model.dtype", "mixtune has no fp16 training; model.dtype: auto, float32 or bfloat16"),
    "torch_dtype": ("model.dtype", ""),
    "logging_steps": ("train.log_every", ""),
    "save_steps": ("train.save_every", ""),
    "eval_steps": ("train.eval_every", ""),
    "eval_strategy": ("train.eval_every", "mixtune evaluates every train.eval_every steps"),
    "evaluation_strategy": ("train.eval_every", "mixtune evaluates every train.eval_every steps"),
    "save_strategy": ("train.save_every", "mixtune saves every train.save_every steps"),
    "save_total_limit": ("train.keep_checkpoints", ""),
    "lr_scheduler_type": ("train.schedule", "mixtune's schedules: constant, linear, cosine"),
    "adam_beta1": ("train.betas", "train.betas is the pair [beta1, beta2]"),
    "adam_beta2": ("train.betas", "train.betas is the pair [beta1, beta2]"),
    "adam_epsilon": ("train.adam_eps", ""),
    "model_name_or_path": ("model.name_or_path", ""),
    "tokenizer_name_or_path": ("model.tokenizer", ""),
    "tokenizer_name": ("model.tokenizer", ""),
    "use_peft": ("model.lora.enabled", ""),
    "lora_r": ("model.lora.r", ""),
    "lora_alpha": ("model.lora.alpha", ""),
    "lora_dropout": ("model.lora.dropout", ""),
    "lora_target_modules": ("model.lora.target_modules", ""),
    "resume_from_checkpoint": ("resume", ""),
    "loss_type": ("loss.name", "mixtune's losses: sft, dft, cadft"),
    "dataset_name": ("datasets", "each datasets entry has a name and a path"),
}
"""Other tools' names for mixtune's keys (transformers ``TrainingArguments``, TRL, axolotl,
LLaMA-Factory): an unknown key found here is answered with ``did you mean <mixtune key>?`` and,
where the meaning differs, how. Keys of another mixtune section (``warmup_steps`` at the top
level, ``seed`` under ``train``) are added below the schema."""

# --------------------------------------------------------------------------------------------
# The schema


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    """Train a LoRA adapter (peft) instead of all parameters."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    """Module names to adapt, or ``all-linear``."""

    SPELLINGS: ClassVar[dict] = SPELLINGS

    def __post_init__(self):
        check(1 <= self.r <= 2**16, "model.lora.r", "must be in [1, 65536] (usually 4-64)", self.r)
        check(0 <= self.dropout < 1, "model.lora.dropout", "must be in [0, 1)", self.dropout)


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "builtin"
    """Hub name, local directory, ``package:<module>`` (the directory of an installed Python
    package), or ``builtin`` (mixtune's embedded tiny base model)."""
    gguf_file: str | None = None
    """A GGUF file inside ``name_or_path`` to load (dequantised; needs ``pip install gguf``).
    The tokenizer comes from the same file unless ``tokenizer`` is set. See docs/models.md."""
    config: dict | None = None
    """Build a randomly initialised model from this transformers config instead of loading
    weights, e.g. ``{model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}``."""
    tokenizer: str | None = None
    """Tokenizer name or path (default: ``name_or_path``); ``byte`` = mixtune's byte tokenizer."""
    chat_template: str | None = None
    """Jinja chat template overriding the tokenizer's (the fallback is documented in
    ``mixtune.data.template``)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weight dtype: ``auto`` = fp32 for trained weights (the master copy under
    ``train.mixed_precision``), bf16 for a LoRA run's frozen base on a bf16-capable GPU;
    ``bfloat16`` = pure bf16 weights, trained ones included (no master copy)."""
    attn_implementation: str | None = None
    """transformers' attention implementation: None = transformers' default for the model
    (``sdpa`` where supported); ``eager``, ``sdpa``, ``flash_attention_2`` (needs the
    ``flash-attn`` package and a CUDA GPU; packed rows then run its variable-length kernel,
    one sequence per example) or any other name transformers accepts. The same values up to
    float rounding, so a resume may change it."""
    lora: LoraConfig = field(default_factory=LoraConfig)

    SPELLINGS: ClassVar[dict] = SPELLINGS

    def __post_init__(self):
        for key in ("name_or_path", "tokenizer"):
            _expand(self, key, f"model.{key}")
        if self.attn_implementation is not None:
            check(
                bool(self.attn_implementation.strip()),
                "model.attn_implementation",
                "must be a name such as sdpa, eager or flash_attention_2 (or null)",
                self.attn_implementation,
            )
        if self.gguf_file is not None:
            check(
                bool(self.gguf_file.strip()),
                "model.gguf_file",
                "must be a file name",
                self.gguf_file,
            )
            if self.config is not None or self.name_or_path in ("builtin", "builtin-bench"):
                raise ConfigError(
                    "model.gguf_file: needs model.name_or_path set to the directory "
                    "(or hub repo) holding the file, and no model.config"
                )


Format = Literal["auto", "messages", "prompt_response", "instruction", "text"]
"""A record format (``mixtune.data.formats``); ``auto`` detects it from the first record."""


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    """Unique name; mixture weights refer to it."""
    path: str
    """Local .jsonl/.json/.parquet/.csv file, a saved or hub ``datasets`` name, or
    ``builtin:<domain>``."""
    split: str = "train"
    """Split of a Hugging Face dataset or built-in domain."""
    subset: str | None = None
    """Configuration (subset) name of a Hugging Face dataset."""
    format: Format = "auto"
    """Record format; ``auto`` detects it from the fields of the first record."""
    fields: dict | None = None
    """Rename fields before detection, e.g. ``{prompt: question, response: solution}``."""
    max_examples: int | None = None
    """Budget: keep at most this many examples (after removing held-out eval examples)."""
    repeat: bool = True
    """Whether the sampler may start another pass once every example has been seen."""
    streaming: bool = False
    """Read lazily and tokenise on the fly (JSONL file, glob or directory of JSONL shards, or
    ``datasets`` with ``streaming=True``); see ``mixtune.data.streaming`` and docs/streaming.md."""
    shuffle_buffer: int = 0
    """Streaming only: examples read, permuted (seeded) and handed out together, plus a seeded
    shard order per epoch; 0 = stream order."""

    def __post_init__(self):
        check_name(self.name, "datasets[].name")
        _expand(self, "path", f"datasets.{self.name}.path")
        check(
            self.shuffle_buffer >= 0,
            f"datasets.{self.name}.shuffle_buffer",
            "must be >= 0",
            self.shuffle_buffer,
        )
        if self.shuffle_buffer and not self.streaming:
            raise ConfigError(
                f"datasets.{self.name}.shuffle_buffer: applies only with streaming: true"
            )
        check(
            self.max_examples is None or self.max_examples >= 1,
            f"datasets.{self.name}.max_examples",
            "must be >= 1 (or null for all)",
            self.max_examples,
        )


MAX_NEW_TOKENS = 4096  # greedy answers for exact match: beyond this a typo, not an answer


@dataclass(frozen=True)
class EvalConfig:
    name: str
    """Unique name of the evaluation domain."""
    path: str | None = None
    """Own source (same kinds as ``datasets[].path``); or use ``from_dataset``."""
    from_dataset: str | None = None
    """Hold out a fraction of this training dataset instead (removed from training)."""
    holdout: float = 0.1
    """Fraction held out with ``from_dataset`` (or a count when >= 1)."""
    split: str = "train"
    subset: str | None = None
    format: Format = "auto"
    fields: dict | None = None
    max_examples: int | None = None
    role: Literal["target", "constraint", "monitor", "test"] = "monitor"
    """What later mixers do with it: improve a target, keep a constraint at its reference.
    ``test``: a held-out report split (of the domain named by ``test_of``), evaluated at every
    scheduled evaluation and logged, but never seen by mixers, probes or checkpoint selection
    -- select on the other domains, report on these (the DynaMiCS paper's protocol)."""
    test_of: str | None = None
    """With ``role: test``: the evaluation domain this is the test split of."""
    metric: Literal["loss", "accuracy"] = "loss"
    """The metric a constraint is stated in."""
    reference: float | None = None
    """Constraint reference value; null = the base model's value measured at step 0."""
    batches: int = 4
    """Number of fixed evaluation batches."""
    batch_size: int = 8
    accuracy: bool | None = None
    """Greedy-generation exact-match accuracy; null = when reference answers exist."""
    answer_field: str = "answer"
    """Record field holding the reference answer (default: the final response)."""
    max_new_tokens: int = 32

    def __post_init__(self):
        check_name(self.name, "evals[].name")
        where = f"evals.{self.name}"
        _expand(self, "path", f"{where}.path")
        if (self.path is None) == (self.from_dataset is None):
            raise ConfigError(f"{where}: give exactly one of 'path' or 'from_dataset'")
        check(
            0 < self.holdout < math.inf, f"{where}.holdout", "must be finite and > 0", self.holdout
        )
        check(
            self.reference is None or math.isfinite(self.reference),
            f"{where}.reference",
            "must be finite (or null)",
            self.reference,
        )
        check(self.batches >= 1, f"{where}.batches", "must be >= 1", self.batches)
        check(self.batch_size >= 1, f"{where}.batch_size", "must be >= 1", self.batch_size)
        check(
            1 <= self.max_new_tokens <= MAX_NEW_TOKENS,
            f"{where}.max_new_tokens",
            f"must be in [1, {MAX_NEW_TOKENS}]",
            self.max_new_tokens,
        )
        if self.metric == "accuracy" and self.accuracy is False:
            raise ConfigError(f"{where}: metric 'accuracy' needs accuracy: true (or null)")
        if (self.role == "test") != (self.test_of is not None):
            raise ConfigError(
                f"{where}: role 'test' and test_of go together (test_of names "
                "the evaluation domain this is the test split of)"
            )
        if self.role == "test" and self.reference is not None:
            raise ConfigError(
                f"{where}.reference: a test domain has no reference (it is "
                f"judged by the reference of '{self.test_of}')"
            )


MAX_BATCH = 2**20  # examples per step: beyond this a typo, not a batch (the sampler allocates it)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8
    """Examples per optimizer step, over all ranks and gradient-accumulation micro-batches."""
    micro_batch_size: int | None = None
    """Examples per forward pass on one rank (default: batch_size / number of processes)."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of max_steps (used when warmup_steps is 0)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (null: no clipping)."""
    max_length: int = 512
    """Truncate tokenised examples to this many tokens."""
    eval_every: int = 50
    """Evaluate every N steps (and at step 0 and at the end); 0 = only at step 0 and the end."""
    log_every: int = 10
    """Log training losses every N steps."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept (older ones are deleted)."""
    final_model: Literal["best_feasible", "last"] = "best_feasible"
    """What ``final/`` holds in a run with target or constraint domains: the best feasible
    evaluated step (or the base model when none was feasible), like HF's
    ``load_best_model_at_end``; or the ``last`` step's model. Runs without such domains always
    keep the last. See engine/answer.py."""
    keep_evaluated: Literal["best", "all"] = "best"
    """Weights-only copies of evaluated steps (``checkpoints/weights/``, no optimizer state),
    which ``mixtune eval --step`` and ``mixtune export --step`` read: ``best`` keeps only the
    best step so far (what ``final/`` needs); ``all`` keeps every evaluated step, so any of them
    can be evaluated and exported after rotation deleted its checkpoint (one copy of the
    trainable weights per evaluation: a few MB each for LoRA)."""
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast: ``bf16`` runs forward and backward in bf16 over the weights' dtype (fp32
    master weights and optimizer state with ``model.dtype: auto``), HF Trainer's ``bf16=True``;
    ``fp16`` the same in float16 with dynamic loss scaling (HF Trainer's ``fp16=True``): the
    loss is multiplied by a scale before backward and the gradients divided by it before
    clipping; a step whose gradients overflow is skipped (no optimizer or LR-schedule step,
    logged as ``skipped_overflow``) and the scale halved, and it doubles after 2,000 clean steps;
    a non-finite *loss*, or an overflow at a scale below 1, is real divergence for
    ``train.nonfinite``. The scale is checkpointed, snapshotted by probes and look-aheads. A
    device without float16 autocast falls back to fp32 with a warning. ``fp32`` = no autocast;
    ``auto`` = bf16 on a bf16-capable GPU, fp32 elsewhere."""
    packing: Literal["auto"] | bool = "auto"
    """Padding-free training steps: each micro-batch's examples concatenated into rows of about
    ``max_length`` tokens (first-fit decreasing), positions restarting per example and no
    attention across examples (transformers' packed-sequence masking). The loss is still
    normalised by the step's global supervised-token count, so it is the padded step's up to
    float rounding. A micro-batch whose examples all have one length has no padding to remove and
    keeps plain rows (no packed mask). Evaluations (scheduled, probes', look-aheads') pack each
    evaluation batch the same way and gather every example's sums from its segment: the padded
    numbers up to float rounding. ``auto`` (default): on, unless the mixer or loss weights
    whole rows (capability ``padded_rows``) or the model's attention cannot keep
    packed examples apart (checked at start with a packed forward): then padded rows, said in
    one info line. ``true`` refuses those cases (exit 2); ``false``: padded rows. The run
    records the resolved value."""
    micro_batch_tokens: int | None = None
    """Fill micro-batches by a token budget instead of ``micro_batch_size`` examples: a rank's
    share of the step (``batch_size`` / processes examples, in order) is cut into micro-batches
    whose tokens -- packed: the sum of the lengths; padded: rows x the longest -- stay within
    this budget (an example longer than it goes alone). Every rank runs as many micro-batches as
    the rank that needs most (all ranks know the global batch; a rank with fewer splits its
    largest ones), so DDP and FSDP stay in step. The loss is still normalised by the step's
    global supervised-token count: the same update as one micro-batch, up to float rounding.
    null: ``micro_batch_size`` examples per micro-batch."""
    logits: Literal["auto", "full", "supervised", "chunked"] = "auto"
    """How the loss gets per-token NLL from the model (mixtune.losses.logits): ``full``
    materialises the (batch, length, vocab) logits, every position's; ``supervised`` projects
    only the supervised tokens' hidden states (no output layer or cross-entropy on prompts and
    padding; their logits kept for the backward); ``chunked`` projects them ``logits_chunk`` at
    a time, recomputed in the backward, so no (tokens, vocab) logits ever exist (a fraction of
    the memory at a large vocabulary). The same values up to float rounding. ``auto``: chunked
    from 32,768 vocabulary entries, supervised below, when the model's logits are a plain
    projection of its hidden states (checked; else full)."""
    logits_chunk: int = 256
    """Supervised tokens per chunk with ``logits: chunked``."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state over the processes with torch's FSDP2
    (``fully_shard`` of every decoder layer, then the root): mixtune's own, on CPUs (gloo) and
    GPUs, independent of accelerate's FSDP plugin. Needs several processes; not with DynaMiCS
    gradient alignment or CADFT rewriting. See docs/distributed.md."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss/gradient is NaN or inf: ``stop`` the run (exit 2; the last checkpoint
    is intact), or ``skip`` its update (no optimizer or scheduler step; counted and logged as
    ``skipped_nonfinite``)."""
    max_nonfinite: int = 10
    """With ``nonfinite: skip``: stop after this many consecutive skipped steps."""
    epochs: float | None = None
    """Run length in passes over the training data, instead of ``max_steps``: max_steps =
    ceil(epochs x N / batch_size), N = the training examples of all datasets together (after
    ``max_examples`` and held-out examples). Resolved once the data is loaded and saved as
    ``max_steps`` in the run's config.yaml (:func:`resolve_epochs`)."""

    SPELLINGS: ClassVar[dict] = SPELLINGS

    def __post_init__(self):
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1", self.batch_size)
        check(
            self.epochs is None or 0 < self.epochs < math.inf,
            "train.epochs",
            "must be finite and > 0 (or null)",
            self.epochs,
        )
        check(self.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1", self.max_nonfinite)
        check(
            self.micro_batch_size is None or self.micro_batch_size >= 1,
            "train.micro_batch_size",
            "must be >= 1",
            self.micro_batch_size,
        )
        check(
            self.batch_size <= MAX_BATCH,
            "train.batch_size",
            f"must be <= {MAX_BATCH}",
            self.batch_size,
        )
        check(self.lr > 0 and math.isfinite(self.lr), "train.lr", "must be > 0 and finite", self.lr)
        check(
            0 <= self.weight_decay < math.inf,
            "train.weight_decay",
            "must be finite and >= 0",
            self.weight_decay,
        )
        check(
            0 < self.adam_eps < math.inf, "train.adam_eps", "must be finite and > 0", self.adam_eps
        )
        check(all(0 <= b < 1 for b in self.betas), "train.betas", "must be in [0, 1)", self.betas)
        check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0", self.warmup_steps)
        check(
            0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)", self.warmup_ratio
        )
        check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "train.max_grad_norm",
            "must be > 0 or null",
            self.max_grad_norm,
        )
        check(self.max_length >= 2, "train.max_length", "must be >= 2", self.max_length)
        for key in ("eval_every", "save_every"):
            check(getattr(self, key) >= 0, f"train.{key}", "must be >= 0", getattr(self, key))
        check(self.log_every >= 1, "train.log_every", "must be >= 1", self.log_every)
        check(self.logits_chunk >= 1, "train.logits_chunk", "must be >= 1", self.logits_chunk)
        if self.micro_batch_tokens is not None and self.micro_batch_size is not None:
            raise ConfigError(
                "train.micro_batch_tokens and train.micro_batch_size: give one of them "
                "(micro-batches filled by tokens, or of a fixed number of examples)"
            )
        check(
            self.micro_batch_tokens is None or self.micro_batch_tokens >= 1,
            "train.micro_batch_tokens",
            "must be >= 1 (or null)",
            self.micro_batch_tokens,
        )
        check(
            self.keep_checkpoints >= 1,
            "train.keep_checkpoints",
            "must be >= 1",
            self.keep_checkpoints,
        )


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/mixtune"
    """Run directory: config, metrics.jsonl, checkpoints, report."""
    seed: int = 0
    max_steps: int | None = None
    """Optimizer steps (default 100); or give ``train.epochs`` instead, not both."""
    resume: str = "auto"
    """``auto``: continue from the latest intact checkpoint in output_dir if any; ``never``:
    refuse to reuse a directory that has checkpoints; or a checkpoint path. A resume must be the
    same run (``run.json``): a changed setting that determines the trajectory is refused, one
    that cannot alter it is recorded in ``amendments.jsonl`` (README, "The run directory")."""
    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: tuple[DatasetConfig, ...] = ()
    """Training datasets (the mixture is over these)."""
    evals: tuple[EvalConfig, ...] = ()
    """Evaluation domains (need not match the training datasets)."""
    mixer: MethodConfig = field(default_factory=lambda: MethodConfig("proportional"))
    loss: MethodConfig = field(default_factory=lambda: MethodConfig("sft"))
    train: TrainConfig = field(default_factory=TrainConfig)
    report_to: tuple[str, ...] = ()
    """Extra trackers through accelerate: ``tensorboard``, ``wandb``."""
    progress: bool = True
    """Show a progress bar."""

    SPELLINGS: ClassVar[dict] = SPELLINGS

    def __post_init__(self):
        if self.max_steps is not None and self.train.epochs is not None:
            raise ConfigError(
                "max_steps and train.epochs: give one of them (the run length in steps, or in "
                "passes over the training data), not both"
            )
        if self.max_steps is None and self.train.epochs is None:
            object.__setattr__(self, "max_steps", DEFAULT_MAX_STEPS)
        if self.train.mixed_precision == "fp16" and self.model.dtype == "bfloat16":
            raise ConfigError(
                "train.mixed_precision: fp16 autocast over model.dtype=bfloat16 weights mixes two "
                "16-bit formats; use model.dtype=auto (fp32 master weights) or "
                "train.mixed_precision=bf16"
            )
        check(
            self.max_steps is None or self.max_steps >= 1,
            "max_steps",
            "must be >= 1",
            self.max_steps,
        )
        _expand(self, "output_dir", "output_dir")
        _expand(self, "resume", "resume")
        check(0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)", self.seed)
        check(
            bool(self.output_dir.strip()) and "\0" not in self.output_dir,
            "output_dir",
            "must be a non-empty path without NUL characters",
            self.output_dir,
        )
        if not self.datasets:
            raise ConfigError("datasets: at least one training dataset is required")
        unique([d.name for d in self.datasets], "datasets")
        unique([e.name for e in self.evals], "evals")
        names = [d.name for d in self.datasets]
        streamed = {d.name for d in self.datasets if d.streaming}
        for e in self.evals:
            if e.from_dataset in streamed:
                raise ConfigError(
                    f"evals.{e.name}.from_dataset: '{e.from_dataset}' is a streaming "
                    "dataset and cannot hold examples out; give the domain a path"
                )
            if e.from_dataset is not None and e.from_dataset not in names:
                raise ConfigError(
                    f"evals.{e.name}.from_dataset: unknown dataset '{e.from_dataset}'; "
                    f"training datasets are {names}"
                )
        roles = {e.name: e.role for e in self.evals}
        for e in self.evals:
            if e.test_of is not None and roles.get(e.test_of) in (None, "test"):
                raise ConfigError(
                    f"evals.{e.name}.test_of: '{e.test_of}' is not a non-test evaluation "
                    f"domain; domains are {[n for n, r in roles.items() if r != 'test']}"
                )
        for t in self.report_to:
            check(
                t in ("tensorboard", "wandb"),
                "report_to",
                "entries must be tensorboard or wandb",
                t,
            )


DEFAULT_MAX_STEPS = 100

# A key of another section written where it does not belong: say where it goes.
SPELLINGS.update(
    {
        f.name: (f"train.{f.name}", f"{f.name} is a train setting")
        for f in dataclasses.fields(TrainConfig)
    }
)
SPELLINGS.update(
    {
        f.name: (f"model.{f.name}", f"{f.name} is a model setting")
        for f in dataclasses.fields(ModelConfig)
    }
)
SPELLINGS.update(
    {f.name: (f.name, f"{f.name} is a top-level key") for f in dataclasses.fields(RunConfig)}
)


def _expand(obj, key: str, where: str) -> None:
    """Expand ``~`` and environment variables in the path field ``key`` of the frozen config
    ``obj``, in place (``__post_init__``)."""
    value = getattr(obj, key)
    if isinstance(value, str):
        object.__setattr__(obj, key, expand_path(value, where))


# --------------------------------------------------------------------------------------------
# Loading and overrides


def load(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    data: dict | None = None,
) -> RunConfig:
    """Read a YAML file (or ``data``), apply ``key=value`` overrides, validate."""
    if data is None:
        data = read_yaml(path) if path is not None else {}
    raw = copy_raw(data)
    written = {s: _method_section(raw.get(s), s) for s in ("mixer", "loss")}
    for item in overrides:
        apply_override(raw, item)
    overridden = {item.partition("=")[0].strip() for item in overrides}
    for section, reg in (("mixer", MIXERS), ("loss", LOSSES)):
        _drop_stale_options(raw, section, reg, written[section], overridden)
    _drop_replaced_length(raw, overridden)
    return from_dict(raw)


def from_dict(raw: dict) -> RunConfig:
    cfg = _validate_methods(build(RunConfig, raw, ""))
    _check_trackers(cfg.report_to)
    _check_local_model(cfg.model)
    return cfg


def resolve_epochs(cfg: RunConfig, sizes: list[int]) -> RunConfig:
    """``cfg`` with ``train.epochs`` turned into ``max_steps`` (unchanged without epochs).

    ``sizes``: the number of training examples of each dataset, as loaded (after
    ``max_examples`` and held-out examples). One epoch is N = sum(sizes) examples drawn, N /
    batch_size steps: under the mixture's initial weights, a pass over the data in expectation
    when they are proportional to the sizes (the default mixer); other weights draw some datasets
    more often than others. The result is ``max_steps = ceil(epochs * N / batch_size)`` with
    ``train.epochs`` cleared, so the run's saved config holds the exact length a resume uses.
    """
    epochs = cfg.train.epochs
    if epochs is None:
        return cfg
    total = int(sum(sizes))
    steps = max(1, math.ceil(epochs * total / cfg.train.batch_size))
    log.info(
        "train.epochs=%g: %d training examples at train.batch_size=%d -> max_steps=%d",
        epochs,
        total,
        cfg.train.batch_size,
        steps,
    )
    return dataclasses.replace(
        cfg, max_steps=steps, train=dataclasses.replace(cfg.train, epochs=None)
    )


def save(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (atomically: a crash never leaves half a config.yaml)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def _method_section(section, where: str) -> tuple[str | None, set]:
    """``(name, option keys)`` of a raw mixer/loss section as written in the file."""
    if isinstance(section, str):
        return section, set()
    if not isinstance(section, dict):
        return DEFAULT_METHODS.get(where), set()
    name = section.get("name", DEFAULT_METHODS.get(where))
    return name, set(section) - {"name"}


def _drop_stale_options(
    raw: dict, section: str, reg: registry.Registry, written: tuple, overridden: set
) -> None:
    """After ``<section>.name=<other>`` on the command line, drop the options written in the
    file for the first method that the new one does not take, with a one-line notice: switching
    method from the command line should not need the file edited. Options given as overrides,
    and any option of a method named in the file itself, are still checked (an unknown key)."""
    old_name, file_keys = written
    node = raw.get(section)
    if not isinstance(node, dict) or not file_keys:
        return
    new_name = node.get("name", old_name)
    if new_name == old_name or not isinstance(new_name, str) or new_name not in reg:
        return
    known = reg.option_names(new_name, section)
    dropped = sorted(
        k for k in file_keys & set(node) if k not in known and f"{section}.{k}" not in overridden
    )
    for k in dropped:
        node.pop(k, None)
    if dropped:
        log.warning(
            "%s: dropped options %s not used by %s '%s'", section, dropped, reg.kind, new_name
        )


def _drop_replaced_length(raw: dict, overridden: set) -> None:
    """``train.epochs=N`` on the command line replaces the file's ``max_steps``, and
    ``max_steps=N`` the file's ``train.epochs`` (one notice line), instead of failing on
    both being set; given both on the command line, they still fail."""
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    given = {"max_steps": raw.get("max_steps"), "train.epochs": train.get("epochs")}
    for new, old in (("train.epochs", "max_steps"), ("max_steps", "train.epochs")):
        if new in overridden and old not in overridden and None not in (given[new], given[old]):
            (train if old == "train.epochs" else raw).pop(old.removeprefix("train."))
            log.warning(
                "%s: dropped (%s from the file), %s=%s given", old, given[old], new, given[new]
            )


def _check_trackers(report_to: tuple[str, ...]) -> None:
    """Every tracker in ``report_to`` must be installed: accelerate would only warn and run
    without logging anything there."""
    for name in report_to:
        modules = ("tensorboard", "tensorboardX") if name == "tensorboard" else (name,)
        if not any(_installed(m) for m in modules):
            raise ConfigError(
                f"report_to: '{name}' is not installed; pip install {name} "
                f"(or remove it from report_to)"
            )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")


def looks_local(name: str) -> bool:
    """Whether a model or tokenizer name is meant as a local path, not a hub ``org/name``:
    it starts with ``/``, ``./``, ``../`` or ``~``, or holds a path separator without being of
    the form ``org/name``."""
    if name.startswith(("/", "./", "../", "~", "." + os.sep, ".." + os.sep)):
        return True
    seps = [c for c in (os.sep, os.altsep) if c]
    return any(c in name for c in seps) and not _HUB_ID.fullmatch(name)


def _check_local_model(model: ModelConfig) -> None:
    """A local-looking ``model.name_or_path`` / ``model.tokenizer`` must exist; otherwise
    transformers would take it for a hub name and retry the hub for a minute."""
    names = [("model.tokenizer", model.tokenizer)]
    if model.config is None or model.tokenizer is None:  # else name_or_path is not read
        names.append(("model.name_or_path", model.name_or_path))
    for where, name in names:
        if name and looks_local(name) and not Path(name).exists():
            raise ConfigError(f"{where}: no such directory: {name}")


def _validate_methods(cfg: RunConfig) -> RunConfig:
    """Parse the mixer's and the loss's options into their typed configs (once), and check that
    ``mixtune train`` can give them what they need (see :mod:`mixtune.registry`)."""
    mixer = MIXERS.options(cfg.mixer, "mixer")
    loss = LOSSES.options(cfg.loss, "loss")
    lacking = train_lacks(cfg)
    for cls, options in ((MIXERS[cfg.mixer.name], mixer), (LOSSES[cfg.loss.name], loss)):
        registry.check_run(cls, options, cfg)
        registry.check(registry.requirements(cls, options), lacking)
    return dataclasses.replace(
        cfg,
        mixer=dataclasses.replace(cfg.mixer, options=mixer),
        loss=dataclasses.replace(cfg.loss, options=loss),
    )


def train_lacks(cfg: RunConfig) -> dict[str, str]:
    """The capabilities ``mixtune train`` cannot give this run, and why (registry.CAPABILITIES)."""
    lacking = {}
    if cfg.train.fsdp:
        lacking["whole_params"] = (
            "train.fsdp shards parameters and gradients over the processes; set train.fsdp=false"
        )
    if cfg.train.packing is True:  # auto falls back to padded rows (engine/build.py)
        lacking["padded_rows"] = (
            "train.packing=true puts several examples in one row; set train.packing=auto or false"
        )
    if cfg.train.micro_batch_tokens is not None:
        why = "train.micro_batch_tokens cuts micro-batches by tokens, not examples; set it to null"
        lacking["padded_rows"] = lacking["example_slots"] = why
    streamed = [d.name for d in cfg.datasets if d.streaming]
    if streamed:
        lacking["random_access"] = (
            f"streaming datasets {streamed} cannot be revisited by index; "
            "set their streaming: false"
        )
    return lacking


def method_options(cfgm: MethodConfig, registry: registry.Registry, section: str):
    """The validated options dataclass of a mixer/loss config (None if it takes none)."""
    return cfgm.options if cfgm.options is not None else registry.options(cfgm, section)
