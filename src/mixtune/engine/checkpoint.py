"""Checkpoints: everything needed to continue a run exactly.

``checkpoints/step-000123/`` holds the trainable weights (``trainable.safetensors``: the full
model, or only the LoRA adapter), ``optimizer.pt``, ``scheduler.pt``, ``sampler.json``,
``mixer.pt``, ``loss.pt`` (the loss's ``state_dict``), one ``rank<r>.pt`` per process (RNG
states and that rank's running sums) and
``state.json`` (step, counters, elapsed time). It is written into ``.tmp-step-000123`` and
renamed into place only once complete (every file, the directory and the rename fsync'd),
so a crash never leaves a half-written checkpoint as the
latest one; directories without ``state.json`` are ignored. Old checkpoints are first renamed
out of the ``step-`` namespace and then deleted, so a crash mid-deletion never leaves a
partial ``step-`` directory either; leftover ``.tmp-*`` directories are removed by the next save.

Test hook: ``MIXTUNE_TEST_CHECKPOINT_PAUSE=<seconds>`` sleeps in the middle of each write (after
the tensors, before ``state.json``) so crash tests can kill a process mid-write.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from mixtune.engine.build import trainable
from mixtune.errors import ConfigError

PREFIX = "step-"


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    root: Path,
    step: int,
    *,
    accelerator,
    model,
    optimizer,
    scheduler,
    sampler,
    mixer,
    state: dict,
    rank_state: dict,
    keep: int,
    loss=None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` (all ranks call this)."""
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a crash mid-write or mid-deletion
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank{rank}.pt")
    _fsync(tmp / f"rank{rank}.pt")
    unwrapped = accelerator.unwrap_model(model)
    params = trainable(unwrapped)
    sharded = any(isinstance(p, DTensor) for _, p in params)
    if sharded:  # FSDP2: every rank gathers (a collective; rank 0 keeps the result) and
        # writes its own optimizer shard
        main = accelerator.is_main_process
        tensors = {n: t for n, t in ((n, _full(p)) for n, p in params) if main}
        name = f"optimizer-rank{rank}.pt"
        torch.save(_local_optimizer_state(optimizer), tmp / name)
        _fsync(tmp / name)
    if accelerator.is_main_process:
        if not sharded:
            tensors = {n: p.detach().cpu().contiguous() for n, p in params}
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "sampler.json").write_text(json.dumps(sampler.state_dict()))
        torch.save(mixer.state_dict(), tmp / "mixer.pt")
        if loss is not None:
            torch.save(loss.state_dict(), tmp / "loss.pt")
        for f in tmp.iterdir():
            if not f.name.startswith("rank"):
                _fsync(f)
    pause = float(os.environ.get("MIXTUNE_TEST_CHECKPOINT_PAUSE") or 0)
    if pause:
        time.sleep(pause)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # state.json last: it marks the directory complete.
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
        _fsync(tmp / "state.json")
        _fsync(tmp)
        if final.exists():  # re-saving a step (resume from an older checkpoint)
            _discard(final)
        tmp.rename(final)
        _fsync(root)  # the rename itself survives a power cut
        for old in complete(root)[:-keep]:
            _discard(old)
    accelerator.wait_for_everyone()
    return final


def _full(p) -> torch.Tensor:
    """A whole trainable tensor on the CPU (FSDP2's DTensor shards are gathered: collective)."""
    p = p.detach()
    return (p.full_tensor() if isinstance(p, DTensor) else p).cpu().contiguous()


def full_state_dict(model, keep: bool = True) -> dict | None:
    """The model's whole state dict when it holds FSDP2 shards (gathered: every rank must call
    this; ranks with ``keep=False`` take part and drop the result, so only one rank holds a full
    copy), else None (``save_pretrained`` reads the model itself)."""
    sd = model.state_dict()
    if not any(isinstance(v, DTensor) for v in sd.values()):
        return None
    return {k: t for k, t in ((k, _full(v)) for k, v in sd.items()) if keep}


def _local_optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with every DTensor replaced by this rank's local shard."""
    sd = optimizer.state_dict()
    sd["state"] = {
        i: {k: v.to_local().cpu() if isinstance(v, DTensor) else v for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    return sd


def _load_local_optimizer_state(optimizer, path: Path, accelerator) -> None:
    """Inverse of :func:`_local_optimizer_state`: this rank's shards back into DTensors. An
    unsharded checkpoint (``optimizer.pt``, from DDP or one process) is sharded on the fly."""
    mine = path / f"optimizer-rank{accelerator.process_index}.pt"
    written = len(list(path.glob("optimizer-rank*.pt")))
    whole = written == 0 and (path / "optimizer.pt").is_file()
    if not whole and (not mine.is_file() or written != accelerator.num_processes):
        raise ConfigError(
            f"checkpoint {path} holds optimizer state sharded over {written} processes; resume "
            f"it with {written} processes (this run has {accelerator.num_processes})"
        )
    sd = torch.load(path / "optimizer.pt" if whole else mine, weights_only=False)
    inner = getattr(optimizer, "optimizer", optimizer)
    order = [p for g in inner.param_groups for p in g["params"]]
    for i, s in sd["state"].items():
        p = order[int(i)]
        if not isinstance(p, DTensor):
            continue
        for k, v in s.items():
            if not torch.is_tensor(v) or v.dim() == 0:
                continue
            if whole and v.shape == p.shape:  # this rank's shard of the full moment
                s[k] = distribute_tensor(
                    v.to(p.device), p.device_mesh, p.placements, src_data_rank=None
                )
            elif not whole and v.shape == p.to_local().shape:
                s[k] = DTensor.from_local(
                    v.to(p.device),
                    p.device_mesh,
                    p.placements,
                    shape=p.shape,
                    stride=p.stride(),
                    run_check=False,
                )
    optimizer.load_state_dict(sd)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk (a checkpoint must survive a
    power cut or a node failure, not only a killed process). Best effort where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. some network file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Delete a checkpoint: one atomic rename out of the ``step-`` namespace, then the files."""
    gone = path.with_name(f".tmp-del-{path.name}")
    shutil.rmtree(gone, ignore_errors=True)
    path.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)


def complete(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.name.startswith(PREFIX)
        and p.name[len(PREFIX) :].isdigit()
        and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def load(
    path: Path, *, accelerator, model, optimizer, scheduler, sampler, mixer, loss=None
) -> tuple[dict, dict]:
    """Restore every component from ``path``; returns ``(state, rank_state)``.
    ``optimizer=None, scheduler=None``: the weights (and the rest) without the training state."""
    unwrapped = accelerator.unwrap_model(model)
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(trainable(unwrapped))
    missing = set(params) - set(tensors)
    if missing:
        raise ValueError(f"checkpoint {path} lacks parameters {sorted(missing)[:3]}...")
    with torch.no_grad():
        for name, p in params.items():
            value = tensors[name].to(p.device, p.dtype)
            if isinstance(p, DTensor):  # this rank's shard of the full tensor (no communication)
                value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(value)
    if optimizer is None:  # weights only (mixtune eval)
        pass
    elif any(isinstance(p, DTensor) for p in params.values()):
        _load_local_optimizer_state(optimizer, path, accelerator)
    elif not (path / "optimizer.pt").is_file() and any(path.glob("optimizer-rank*.pt")):
        n = len(list(path.glob("optimizer-rank*.pt")))
        raise ConfigError(
            f"checkpoint {path} holds optimizer state sharded over {n} processes "
            f"(train.fsdp); resume it with train.fsdp=true and {n} processes"
        )
    else:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    sampler.load_state_dict(json.loads((path / "sampler.json").read_text()))
    mixer.load_state_dict(torch.load(path / "mixer.pt", weights_only=False))
    if loss is not None and (path / "loss.pt").is_file():  # (older checkpoints may lack it)
        loss.load_state_dict(torch.load(path / "loss.pt", weights_only=False))
    rank_state = torch.load(path / f"rank{accelerator.process_index}.pt", weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    state = json.loads((path / "state.json").read_text())
    return state, rank_state
