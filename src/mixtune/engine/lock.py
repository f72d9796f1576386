"""The run directory's lock: one ``mixtune train`` writes a run directory at a time.

:class:`Trainer(cfg) <mixtune.engine.loop.Trainer>` (a writer, the default) takes it when it is
built, before anything reads or writes the run directory (the resume checks, checkpoint selection,
config.yaml, metrics.jsonl, checkpoints), and :meth:`Trainer.run` releases it when it returns or
raises (:meth:`Trainer.close` when it is never run). It is an
exclusive ``fcntl.flock`` on ``<output_dir>/train.lock``, which the kernel drops when the holder
dies, however it dies. The file says who holds it (pid, host, since when), for the one-line
error a second writer gets (exit 2). A clean release removes the file, so a lock file found
unlocked was left by a killed process: it is taken over, and the log says so.

In a distributed run only the main process (the one that writes the run directory) holds it,
and every rank learns whether it got it, so that all of them stop together. Readers (``mixtune
eval``, ``export``, ``report``; ``Trainer(cfg, writer=False)``) never take it. On NFS, Linux
emulates flock with a whole-file POSIX lock, which holds across machines where the server
supports locking.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import torch

from mixtune.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"


class RunDirLocked(ConfigError):
    """Another process is training in this run directory."""


class RunLock:
    """A held lock on a run directory; :meth:`release` gives it up (idempotent)."""

    def __init__(self, path: Path, fd: int, created: Path | None):
        self.path, self._fd, self._created = path, fd, created

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlinked while still locked: a process waiting on this file then finds it replaced
        # (acquire checks the inode) instead of taking a lock nobody else can see.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
        # A run that failed before writing anything leaves no directory it created behind.
        d = self.path.parent
        while self._created is not None and d.is_relative_to(self._created):
            try:
                d.rmdir()
            except OSError:  # not empty: the run wrote something
                break
            d = d.parent

    def __del__(self):  # a holder dropped without release (never relied on: a safety net)
        if self._fd is not None:
            try:
                self.release()
            except Exception:  # (at interpreter exit, modules may be gone already)
                pass


def acquire(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` (created if missing) or raise :class:`RunDirLocked` naming the holder."""
    created = next((p for p in [*reversed(run_dir.parents), run_dir] if not p.exists()), None)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except IsADirectoryError:
            raise ConfigError(
                f"{path} is a directory, not mixtune's lock file; move it away, or choose "
                "another output_dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_holder(fd))
            os.close(fd)
            raise RunDirLocked(
                f"output_dir {run_dir} is in use by {holder}; wait for that run to finish or "
                "stop it, or choose another output_dir"
            ) from None
        try:  # released (and unlinked) between our open and flock: lock the new file instead
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    stale = _holder(fd)
    if stale is not None:
        log.warning(
            "%s was left by %s, which has exited without releasing it; taking it over",
            path,
            _describe(stale),
        )
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%F %T %z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return RunLock(path, fd, created)


def _holder(fd: int) -> dict | None:
    """What the lock file says about its holder (None if empty: not written yet)."""
    raw = os.pread(fd, 4096, 0)
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict | None) -> str:
    if not info:
        return "another mixtune train (it has not recorded its pid yet)"
    pid, host, since = (info.get(k, "?") for k in ("pid", "host", "since"))
    mine = pid == os.getpid() and host == socket.gethostname()
    # A second Trainer in one process (a notebook, a script): the first still holds the lock.
    hint = " -- this very process: close() its other Trainer first" if mine else ""
    return f"mixtune train pid {pid} on {host} (since {since}){hint}"


def take(run_dir: Path, accelerator) -> RunLock | None:
    """Take ``run_dir``'s lock on the main process (returned; None on the other ranks); every
    rank raises :class:`RunDirLocked` if it could not be taken (a collective when distributed,
    so that no rank goes on alone or hangs)."""
    lock, failed = None, None
    if accelerator.is_main_process:
        try:
            lock = acquire(Path(run_dir))
        except Exception as e:  # raised below, once the other ranks know (they would hang)
            failed = e
    try:
        if accelerator.num_processes > 1:  # a collective: every rank learns the outcome
            code = 0 if failed is None else 1 if isinstance(failed, RunDirLocked) else 2
            flag = torch.tensor([code], device=accelerator.device)
            code = int(accelerator.gather(flag).max().item())
            if code and failed is None:
                failed = RunDirLocked(
                    f"output_dir {run_dir} is in use (see the main process's error)"
                    if code == 1
                    else f"output_dir {run_dir} could not be locked (see the main process's error)"
                )
        if failed is not None:
            raise failed
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


@contextlib.contextmanager
def hold(run_dir: Path, accelerator):
    """Hold ``run_dir``'s lock for the body (:func:`take`); released on any exit."""
    lock = take(run_dir, accelerator)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
