"""Checkpoints: everything needed to continue a run exactly.

``checkpoints/step-000123/`` holds the trainable weights (``trainable.safetensors``: the full
model, or only the LoRA adapter), ``optimizer.pt``, ``scheduler.pt``, ``sampler.json``,
``mixer.pt``, ``loss.pt`` (when the loss has state), one ``rank<r>.pt`` per process (RNG
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

from mixtune.engine.setup import trainable

PREFIX = "step-"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: Path, step: int, *, accelerator, model, optimizer, scheduler, sampler, mixer,
         state: dict, rank_state: dict, keep: int, loss=None) -> Path:
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
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        tensors = {n: p.detach().cpu().contiguous() for n, p in trainable(unwrapped)}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "sampler.json").write_text(json.dumps(sampler.state_dict()))
        torch.save(mixer.state_dict(), tmp / "mixer.pt")
        if hasattr(loss, "state_dict"):
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
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def load(path: Path, *, accelerator, model, optimizer, scheduler, sampler, mixer,
         loss=None) -> tuple[dict, dict]:
    """Restore every component from ``path``; returns ``(state, rank_state)``."""
    unwrapped = accelerator.unwrap_model(model)
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(trainable(unwrapped))
    missing = set(params) - set(tensors)
    if missing:
        raise ValueError(f"checkpoint {path} lacks parameters {sorted(missing)[:3]}...")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    sampler.load_state_dict(json.loads((path / "sampler.json").read_text()))
    mixer.load_state_dict(torch.load(path / "mixer.pt", weights_only=False))
    if hasattr(loss, "load_state_dict") and (path / "loss.pt").is_file():
        loss.load_state_dict(torch.load(path / "loss.pt", weights_only=False))
    rank_state = torch.load(path / f"rank{accelerator.process_index}.pt", weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    state = json.loads((path / "state.json").read_text())
    return state, rank_state
