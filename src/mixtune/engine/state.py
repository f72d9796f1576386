"""TrainState: what branch runs and method hooks may read of a run, as one typed object.

The optimizer step (:mod:`mixtune.engine.step`), probes and look-aheads
(:mod:`mixtune.engine.probe`), gradient alignment (:mod:`mixtune.engine.alignment`), a loss's
hooks (:class:`mixtune.losses.base.Loss`: batch statistics, rewriting of training targets) and
the Hugging Face adapter (:mod:`mixtune.integrations.hf`) take a :class:`TrainState` instead of
the whole :class:`~mixtune.engine.loop.Trainer`. The
Trainer builds one when it is constructed; the HF adapter builds one from what a HF ``Trainer``
hands its callbacks. Fields a driver cannot supply are ``None`` (the HF adapter has no
evaluation, no branch training and no rewriting: the methods needing them are refused there by
their declared requirements).

Every field is set once, except ``step``: the owner advances it after each optimizer step
(slots: nothing else can be attached to it). The objects it refers to (model, optimizer,
sampler, datasets) are the run's own, not copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mixtune.config import ModelConfig
from mixtune.data.domains import EvalDomain, TrainSet
from mixtune.data.sampler import MixtureSampler


class Accelerator(Protocol):
    """The calls the step, branch runs and loss hooks make (``accelerate.Accelerator`` has them
    all; the HF adapter's stand-in has those of the look-ahead)."""

    device: torch.device
    is_main_process: bool

    def autocast(self): ...
    def no_sync(self, model: torch.nn.Module): ...
    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def gather(self, x: torch.Tensor) -> torch.Tensor: ...
    def reduce(self, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor: ...
    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module: ...


@dataclass(eq=False, slots=True)
class TrainState:
    """One run's training state, as branch runs and method hooks see it."""

    acc: Accelerator
    model: torch.nn.Module
    """The model as trained (wrapped by accelerate / DDP / FSDP2 where the run does so)."""
    params: list[torch.Tensor]
    """The trainable parameters (for LoRA only the adapter): what a snapshot copies."""
    optimizer: Any
    """The run's optimizer (accelerate's wrapper or a torch optimizer)."""
    scheduler: Any
    """The LR scheduler stepped with the optimizer."""
    sampler: MixtureSampler
    train_sets: Sequence[TrainSet]
    """Training datasets in weight order (``data.streaming.StreamSet`` duck-types TrainSet)."""
    world: int
    """Processes in the run."""
    rank: int
    """This process's index."""
    micro: int
    """Examples per micro-batch on each rank."""
    batch_size: int
    """Global examples per optimizer step."""
    max_steps: int
    seed: int
    pad_token_id: int
    domains: Sequence[EvalDomain] = ()
    """Evaluation domains mixers may see (test splits excluded)."""
    tokenizer: Any = None
    """The training tokenizer (rewriting decodes and re-renders with it)."""
    model_config: ModelConfig | None = None
    """The run's ``model`` section (rewriting loads another generator model like it)."""
    max_length: int | None = None
    """``train.max_length``: the longest training sequence."""
    run_dir: Path | None = None
    """The run directory (rewriting writes ``rewrites.jsonl`` there)."""
    train_step: Callable[[np.ndarray, np.ndarray], Any] | None = None
    """One optimizer step on a global batch ``(dataset ids, example ids)``: probes' branches."""
    evaluate: Callable[..., dict] | None = None
    """Per-domain metrics now (``Trainer.evaluate``'s signature)."""
    replace_example: Callable[[int, int, np.ndarray, np.ndarray], None] | None = None
    """Swap training example ``(dataset, index)`` for new ``(input_ids, labels)``."""
    scaler: Any = None
    """The fp16 loss scaler (:class:`mixtune.engine.precision.LossScaler`), None otherwise."""
    step: int = 0
    """Completed optimizer steps: the one field that changes during a run."""
