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

One file, longer than most: it is the whole user-facing schema of a run, every field with its
documentation, read top to bottom by users and by ``mixtune`` alike; split, it would scatter
one reference page over several.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from mixtune import registry
from mixtune.errors import ConfigError
from mixtune.rawconfig import apply_override, read_yaml
from mixtune.registry import LOSSES, MIXERS
from mixtune.schema import MethodConfig, build, check, check_name, copy_raw, to_dict, unique

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
    """Parameter dtype: ``auto`` = bf16 on a bf16-capable GPU, else fp32."""
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
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
    gradient_checkpointing: bool = False
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

    def __post_init__(self):
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1", self.batch_size)
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
    max_steps: int = 100
    """Optimizer steps."""
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

    def __post_init__(self):
        check(self.max_steps >= 1, "max_steps", "must be >= 1", self.max_steps)
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
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw)


def from_dict(raw: dict) -> RunConfig:
    return _validate_methods(build(RunConfig, raw, ""))


def save(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (atomically: a crash never leaves half a config.yaml)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


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
