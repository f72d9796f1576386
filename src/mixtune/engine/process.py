"""Process-level pieces of a run: the accelerator, seeding, signals, output checks, progress.

Kept apart from :mod:`mixtune.engine.loop` so the loop reads as the training step and its
bookkeeping only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading

import numpy as np
import torch

from mixtune.config import RunConfig
from mixtune.engine import build
from mixtune.errors import ConfigError

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after a final checkpoint; ``signum`` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator

    # Accelerator(cpu=True) on a machine without CUDA: otherwise torchrun's processes would
    # each train undistributed.
    cpu = not torch.cuda.is_available()
    mp = build.pick_mixed_precision(cfg.train.mixed_precision)
    # accelerate keeps one process-wide state and refuses a second Accelerator with another
    # precision; runs in one process (tests, suites, notebooks) may differ. The process group
    # (PartialState) is kept.
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mp:
        AcceleratorState._reset_state()
    acc = Accelerator(
        cpu=cpu,
        mixed_precision=mp,
        log_with=list(cfg.report_to) or None,
        project_dir=cfg.output_dir,
    )
    kind = getattr(acc.distributed_type, "value", str(acc.distributed_type))
    if kind == "DEEPSPEED":  # docs/distributed.md: what breaks, and what would be needed
        raise ConfigError(
            "accelerate: DeepSpeed is not supported by mixtune's loop yet (its "
            "backward() steps the optimizer, and probe snapshots miss ZeRO's "
            "master weights); use DDP or FSDP (configs/accelerate/)"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and kind != "FSDP":
        log.warning(
            "FSDP was requested but accelerate runs %s (it enables FSDP on GPUs "
            "only): parameters are replicated on every rank",
            kind,
        )
    return acc


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def catch_signals(trainer):
    """SIGINT/SIGTERM set ``trainer.stop_signal``; the loop checkpoints and stops after the
    current step. A second signal acts at once (the checkpoint write is atomic either way)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if trainer.stop_signal is not None:  # second signal: give up waiting
            raise Interrupted(f"stopped by {signal.Signals(signum).name} (second signal)", signum)
        trainer.stop_signal = signum
        log.warning(
            "%s received: stopping after this step with a checkpoint (send it again "
            "to stop at once)",
            signal.Signals(signum).name,
        )

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def check_writable(path) -> None:
    """``output_dir`` must be (or become) a directory we can write: fail before any work."""
    probe_path = path
    while not probe_path.exists() and probe_path != probe_path.parent:
        probe_path = probe_path.parent
    if not probe_path.is_dir():
        raise ConfigError(
            f"output_dir: {probe_path} is a file, not a directory; choose another "
            f"output_dir than {path}"
        )
    if not os.access(probe_path, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {probe_path} is not writable")


def progress(cfg: RunConfig, start: int, main: bool):
    from tqdm.auto import tqdm

    if not (main and cfg.progress):  # nor transformers' own bars (saving the final model)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return tqdm(
        total=cfg.max_steps,
        initial=start,
        desc="train",
        unit="step",
        disable=not (main and cfg.progress),
        dynamic_ncols=True,
    )


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def shard_fsdp2(model, optimizer):
    """FSDP2 in place of DDP: ``fully_shard`` every decoder layer (the model's
    ``_no_split_modules`` classes), then the root; the optimizer's groups are pointed at the
    sharded (DTensor) parameters, so the LR scheduler built on it stays valid."""
    from torch.distributed.fsdp import fully_shard

    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = set(getattr(base, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    sharded = dict(model.named_parameters())
    for g, ns in zip(optimizer.param_groups, groups):
        g["params"] = [sharded[n] for n in ns]
    return model, optimizer


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (FSDP2 DTensor shard), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (a clipped gradient norm under FSDP2) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
