"""Checkpoints: everything needed to continue a run exactly, and a manifest that vouches for it.

``checkpoints/step-000123/`` holds the trainable weights (``trainable.safetensors``: the full
model, or only the LoRA adapter), ``optimizer.pt``, ``scheduler.pt``, ``sampler.json``,
``mixer.pt``, ``loss.pt`` (the loss's ``state_dict``), one ``rank<r>.pt`` per process (RNG
states and that rank's running sums), ``state.json`` (step, counters, elapsed time) and, written
last, ``manifest.json``: the size and SHA-256 of every other file (each hashed on its way to the
disk, :class:`~mixtune.engine.integrity.Writer`, not read back). It is written into
``.tmp-step-000123`` and renamed into place only once complete (every file, the directory and
the rename fsync'd), so a crash never leaves a half-written checkpoint as the latest one;
directories with neither ``state.json`` nor a manifest are ignored. Old checkpoints are first
renamed out of the ``step-`` namespace and then deleted, so a crash mid-deletion never leaves a
partial ``step-`` directory either; leftover ``.tmp-*`` directories are removed by the next save.

Integrity (:mod:`mixtune.engine.integrity`): a checkpoint is used only if every file matches the
manifest, so a truncated, missing or bit-flipped file is found before anything is loaded.
``resume=auto`` takes the newest checkpoint that verifies (:func:`complete`), reporting each
damaged one it passes over and leaving it in place; an explicit ``resume=<dir>`` that fails is
bad input.
Checkpoints written before manifests existed have none: they still load, unverified.

Safety: the ``.pt`` files are read with ``torch.load(weights_only=True)``, which rebuilds tensors
and plain data only, plus the numpy arrays and scalars that RNG states and loss statistics hold
(:data:`SAFE_GLOBALS`). A file that names anything else (a class whose unpickling could run code)
is refused, not executed.

Test hook: ``MIXTUNE_TEST_CHECKPOINT_PAUSE=<seconds>`` sleeps in the middle of each write (after
the tensors, before ``state.json``) so crash tests can kill a process mid-write.

Kept whole (about 340 lines) on purpose: the on-disk format is written and read here, and the
save, its rotation and the load -- FSDP2's sharded optimizer files included -- must agree file
by file; side by side they are checked at a glance. Integrity lives in its own module.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from mixtune.engine.build import trainable
from mixtune.engine.integrity import (
    MANIFEST,
    Writer,
    check,
    fsync,
    read,
    verify,
    write_manifest,
)
from mixtune.errors import ConfigError, OutOfSpace

log = logging.getLogger(__name__)

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
    """Write checkpoint ``step`` under ``root`` (all ranks call this).

    A full disk (or quota) is :class:`OutOfSpace`, one line naming the step and the last
    complete checkpoint; the half-written directory is removed, so the latest checkpoint stays
    the last complete one and the same command resumes from it once there is room.
    """
    with _room_for(root, step):
        final = root / f"{PREFIX}{step:06d}"
        tmp = root / f".tmp-{PREFIX}{step:06d}"
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):  # left by a crash mid-write or mid-deletion
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        rank = accelerator.process_index
        # Every file is fsync'd as it is written and hashed on its way out (the manifest's
        # SHA-256s, without reading the files back; other ranks' files are read by rank 0).
        out = Writer(tmp)
        out.torch({**rank_state, "rng": rng_state()}, f"rank{rank}.pt")
        unwrapped = accelerator.unwrap_model(model)
        params = trainable(unwrapped)
        sharded = any(isinstance(p, DTensor) for _, p in params)
        if sharded:  # FSDP2: every rank gathers (a collective; rank 0 keeps the result) and
            # writes its own optimizer shard
            main = accelerator.is_main_process
            tensors = {n: t for n, t in ((n, _full(p)) for n, p in params) if main}
            out.torch(_local_optimizer_state(optimizer), f"optimizer-rank{rank}.pt")
        if accelerator.is_main_process:
            if not sharded:
                tensors = {n: p.detach().cpu().contiguous() for n, p in params}
                out.torch(optimizer.state_dict(), "optimizer.pt")
            out.safetensors(tensors, "trainable.safetensors")
            out.torch(scheduler.state_dict(), "scheduler.pt")
            out.bytes(json.dumps(sampler.state_dict()).encode(), "sampler.json")
            out.torch(mixer.state_dict(), "mixer.pt")
            if loss is not None:
                out.torch(loss.state_dict(), "loss.pt")
        pause = float(os.environ.get("MIXTUNE_TEST_CHECKPOINT_PAUSE") or 0)
        if pause:
            time.sleep(pause)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # "manifest": a manifest.json deleted later is then missed, not taken for an old format
            record = {**state, "step": step, "manifest": MANIFEST}
            out.bytes(json.dumps(record, indent=1).encode(), "state.json")
            # The manifest last: sizes and hashes of every file, each rank's included.
            write_manifest(tmp, out.hashed)
            fsync(tmp)
            if final.exists():  # re-saving a step (resume from an older checkpoint)
                _discard(final)
            tmp.rename(final)
            fsync(root)  # the rename itself survives a power cut
            # Keep the newest `keep` up to this step. Later ones (a resume from an older or past a
            # damaged checkpoint) stay until this run writes their step again.
            upto = [p for p in listed(root) if _step(p) <= step]
            for old in upto[:-keep]:
                _discard(old)
        accelerator.wait_for_everyone()
        return final


@contextlib.contextmanager
def _room_for(root: Path, step: int):
    """A full disk (or quota) while writing checkpoint ``step``: remove the half-written
    directory and say so in one line (:class:`OutOfSpace`)."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        shutil.rmtree(root / f".tmp-{PREFIX}{step:06d}", ignore_errors=True)
        last = listed(root)
        raise OutOfSpace(
            f"no space left on device while writing checkpoint step {step} in {root}; the last "
            f"complete checkpoint is {last[-1].name if last else 'none'}: free space and run "
            "the same command to resume from it"
        ) from None


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
    sd = read(path, "optimizer.pt" if whole else mine.name)
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


def _discard(path: Path) -> None:
    """Delete a checkpoint: one atomic rename out of the ``step-`` namespace, then the files."""
    gone = path.with_name(f".tmp-del-{path.name}")
    _remove(gone)
    path.rename(gone)
    _remove(gone)


def _remove(path: Path) -> None:
    """Delete a directory tree, or just the link when ``path`` is a symlink to one (a checkpoint
    kept on another disk: its target is the user's, and rmtree refuses links)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def listed(root: Path) -> list[Path]:
    """Checkpoint directories under ``root`` (``state.json`` or a manifest), oldest first."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.name.startswith(PREFIX)
        and p.name[len(PREFIX) :].isdigit()
        and ((p / "state.json").is_file() or (p / MANIFEST).is_file())
    ]
    return sorted(found, key=_step)


def _step(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def complete(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first; the last one verifies.

    Checked newest first, in full (``integrity.problem``), until one verifies: each damaged one
    on the way is reported in the log (once per process), left out and left in place. The older ones
    are returned unchecked (hashing every kept checkpoint would cost a resume several times
    over); :func:`load` verifies whichever is chosen.
    """
    found = listed(root)
    for i in range(len(found) - 1, -1, -1):
        bad, fresh = check(found[i])
        if bad is None:
            return found[: i + 1]
        if fresh:  # (not again for files this process has already found damaged)
            log.warning("checkpoint %s is damaged (%s): skipped, left in place", found[i], bad)
    return []


def trainable_tensors(model, keep: bool = True) -> dict | None:
    """The trainable tensors on the CPU by parameter name, as a checkpoint stores them. FSDP2
    shards are gathered: every rank must call this; ranks with ``keep=False`` take part and
    get None."""
    params = trainable(model)
    if any(isinstance(p, DTensor) for _, p in params):
        gathered = [(n, _full(p)) for n, p in params]
        return dict(gathered) if keep else None
    return {n: p.detach().cpu().contiguous() for n, p in params} if keep else None


def load_trainable(path: Path, model, verified: bool = False) -> dict:
    """Copy ``path/trainable.safetensors`` (a checkpoint, or a weights-only copy of an
    evaluated step: engine/answer.py) into ``model``'s trainable parameters, once ``path``
    verifies against its manifest; returns the parameters by name."""
    if not verified:
        verify(path)
    tensors = read(path, "trainable.safetensors", "safetensors")
    params = dict(trainable(model))
    missing = set(params) - set(tensors)
    if missing:
        raise ConfigError(
            f"checkpoint {path} lacks parameters {sorted(missing)[:3]}...; it was written for "
            "another model or LoRA setting"
        )
    with torch.no_grad():
        for name, p in params.items():
            value = tensors[name].to(p.device, p.dtype)
            if isinstance(p, DTensor):  # this rank's shard of the full tensor (no communication)
                value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(value)
    return params


def load(
    path: Path, *, accelerator, model, optimizer, scheduler, sampler, mixer, loss=None
) -> tuple[dict, dict]:
    """Restore every component from ``path``, once it verifies; returns ``(state, rank_state)``.
    ``optimizer=None, scheduler=None``: the weights (and the rest) without the training state."""
    verify(path)
    params = load_trainable(path, accelerator.unwrap_model(model), verified=True)
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
        optimizer.load_state_dict(read(path, "optimizer.pt"))
    if scheduler is not None:
        scheduler.load_state_dict(read(path, "scheduler.pt"))
    sampler.load_state_dict(read(path, "sampler.json", "json"))
    mixer.load_state_dict(read(path, "mixer.pt"))
    if loss is not None and (path / "loss.pt").is_file():  # (older checkpoints may lack it)
        loss.load_state_dict(read(path, "loss.pt"))
    rank_state = read(path, f"rank{accelerator.process_index}.pt")
    set_rng_state(rank_state.pop("rng"))
    state = read(path, "state.json", "json")
    return state, rank_state
