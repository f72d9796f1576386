"""Writing into a run directory on a disk that may fill up or refuse writes.

One mechanism for every write site: :func:`disk_problem` recognises a failed write however the
writer reports it (``OSError`` ENOSPC / EDQUOT / EROFS / EACCES / EPERM; torch's
``[enforce fail ...] unexpected pos`` and ``file write failed``; safetensors' ``No space left on
device (os error 28)``), and :func:`writing` turns it into one line,
:class:`~mixtune.errors.OutOfSpace` (exit 1): what was being written, where, and the last
complete checkpoint, which the same command resumes from once there is room again. The CLI
applies the same recognition to any failure no :func:`writing` block named (``mixtune.cli``),
so a write site nobody wrapped still ends in one line, only less specific.

Nothing half-written may be taken for a finished file or directory: :func:`atomic_text` and
:func:`atomic_dir` write a temporary sibling and rename it into place only once complete; on a
failure the sibling is removed and what was there before stays.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from mixtune.errors import OutOfSpace

_ERRNO = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
# How writers that do not raise OSError say the same (torch's zip writer, safetensors' Rust IO).
_TEXT = {
    "no space left on device": "no space left on device",
    "os error 28": "no space left on device",
    "storagefull": "no space left on device",
    "disk quota exceeded": "disk quota exceeded",
    "read-only file system": "read-only file system",
    "unexpected pos": "no space left on device",  # PyTorchStreamWriter's short write
    "file write failed": "no space left on device",
}


def disk_problem(e: BaseException | None) -> str | None:
    """What a failed write ran into ("no space left on device", "read-only file system", ...),
    or None when ``e`` (or what caused it) is not a write refused by the disk."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _ERRNO:
            return _ERRNO[e.errno]
        if isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError":
            text = str(e).lower()
            for needle, what in _TEXT.items():
                if needle in text:
                    return what
        e = e.__cause__ or e.__context__
    return None


def last_checkpoint(run_dir: Path | None) -> str:
    """The name of the newest checkpoint of ``run_dir`` (``none`` when there is none)."""
    from mixtune.engine.checkpoint import listed  # (checkpoint imports torch: only when needed)

    if run_dir is None:
        return "none"
    try:
        found = listed(Path(run_dir) / "checkpoints")
    except OSError:
        return "unknown (the run directory cannot be read)"
    return found[-1].name if found else "none"


def message(problem: str, what: str, where: Path | str | None, run_dir: Path | None) -> str:
    """The one line: what the disk refused, what was being written, where, and the way on."""
    at = f" in {where}" if where else ""
    if run_dir is None:  # not a training run (export, eval.json, a report)
        return f"{problem} while writing {what}{at}; make room (or make it writable) and retry"
    return (
        f"{problem} while writing {what}{at}; the last complete checkpoint is "
        f"{last_checkpoint(run_dir)}: make room (or make it writable) and run the same command "
        "to resume from it"
    )


@contextlib.contextmanager
def writing(what: str, where: Path | str, run_dir: Path | None = None, cleanup: Path | None = None):
    """Run the body's writes; a write the disk refuses becomes :class:`OutOfSpace` naming
    ``what`` and ``where`` (``cleanup``: a half-written path removed first). Other errors pass."""
    try:
        yield
    except OutOfSpace:
        raise
    except Exception as e:
        problem = disk_problem(e)
        if problem is None:
            raise
        if cleanup is not None:
            _remove(Path(cleanup))
        raise OutOfSpace(message(problem, what, where, run_dir)) from None


def atomic_text(path: Path, text: str) -> None:
    """Write ``path`` through a temporary sibling renamed into place (a reader, or a crash,
    never sees it half-written; a failed write leaves the old content)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of directory ``final`` to write; once the body succeeds it
    replaces ``final`` (the old one is moved aside, then deleted). On a failure the sibling is
    removed and ``final`` is as it was."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    _remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old = final.with_name(f".tmp-old-{final.name}")
    _remove(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _remove(old)


def discard(path: Path) -> None:
    """Delete a directory a reader may be reading: one rename out of its name first, so the
    reader finds it either whole or gone, never half-deleted."""
    path = Path(path)
    gone = path.with_name(f".tmp-del-{path.name}")
    _remove(gone)
    with contextlib.suppress(FileNotFoundError):
        path.rename(gone)
    _remove(gone)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
