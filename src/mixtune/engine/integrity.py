"""Checkpoint integrity: a manifest that vouches for every file, and loading that runs no code.

A checkpoint is used only if every file matches its ``manifest.json`` (size and SHA-256, written
last, :func:`write_manifest`, from the hashes :class:`Writer` computed while writing the files),
so a truncated, missing or bit-flipped file is found before anything is loaded (:func:`problem`,
:func:`verify`). Checkpoints written before manifests
existed have none: they pass when their ``state.json`` is there, and load unverified.

The ``.pt`` files are read with ``torch.load(weights_only=True)`` (:func:`read`), which rebuilds
tensors and plain data only, plus the numpy arrays and scalars that RNG states and loss
statistics hold (:data:`SAFE_GLOBALS`). A file that names anything else (a class whose
unpickling could run code) is refused, not executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from mixtune.errors import ConfigError

MANIFEST = "manifest.json"
FORMAT = 1  # the checkpoint layout this version writes and reads (manifest.json's "format")


def _numpy_globals() -> list:
    # What pickled numpy arrays and scalars name (numpy's RNG state in rank<r>.pt, CADFT's
    # rewriting table in loss.pt): the array and scalar constructors, under both module paths
    # (numpy 2 writes numpy._core, numpy 1 wrote numpy.core: a checkpoint survives an upgrade),
    # and the numeric dtypes only (no object arrays).
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    codes = "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]
    out: list = [np.ndarray, np.dtype, *{type(np.dtype(c)) for c in codes}]
    for fn in (core._reconstruct, core.scalar):
        out += [(fn, f"numpy.{m}.multiarray.{fn.__name__}") for m in ("core", "_core")]
    return out


SAFE_GLOBALS = _numpy_globals()
"""What ``weights_only`` loading allows besides tensors and plain Python data (found by
loading the checkpoints of every example config)."""


def fsync(path: Path) -> None:
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


# What this process found, per checkpoint, with the (name, size, mtime, inode) of its files then:
# Trainer.__init__ chooses the resume point and run() loads it, and each is hashed only once.
_CHECKED: dict[Path, tuple[tuple, str | None]] = {}


def problem(path: Path) -> str | None:
    """What is wrong with checkpoint ``path``, naming the file, or None when every file matches
    the manifest. A checkpoint without a manifest was written before manifests existed: it
    passes when its ``state.json`` is there, and is loaded unverified."""
    return check(path)[0]


def check(path: Path) -> tuple[str | None, bool]:
    """``(problem, fresh)``: fresh unless known from an earlier check of the same files."""
    try:
        seen = tuple(
            sorted(
                (f.name, s.st_size, s.st_mtime_ns, s.st_ino)
                for f in path.iterdir()
                for s in [f.stat()]
            )
        )
    except OSError:  # gone, or changing under us: check it afresh
        seen = None
    key = path.resolve()
    if seen is not None and key in _CHECKED and _CHECKED[key][0] == seen:
        return _CHECKED[key][1], False
    found = _problem(path)
    if seen is not None:
        _CHECKED[key] = (seen, found)
    return found, True


def _problem(path: Path) -> str | None:
    manifest = path / MANIFEST
    if not manifest.is_file():  # written before manifests existed, or lost its manifest
        try:
            state = json.loads((path / "state.json").read_text())
        except FileNotFoundError:
            return "state.json is missing"
        except (OSError, ValueError) as e:
            return f"state.json is unreadable ({type(e).__name__})"
        if not isinstance(state, dict):
            return "state.json is unreadable (not a JSON object)"
        return f"{MANIFEST} is missing" if "manifest" in state else None
    try:
        data = json.loads(manifest.read_text())
        fmt = data.get("format", 1)
        files = data["files"]
        want = {name: (int(e["size"]), str(e["sha256"])) for name, e in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(fmt, int) or fmt > FORMAT:
        return (
            f"written by a newer mixtune (checkpoint format {fmt!r}; this version reads "
            f"{FORMAT}); upgrade mixtune to resume from it"
        )
    for name, (size, _) in want.items():
        try:
            actual = (path / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size} (truncated?)"
    for name, (_, digest) in want.items():
        if sha256(path / name) != digest:
            return f"{name} does not match its SHA-256 in the manifest (corrupted)"
    return None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):  # streamed: a checkpoint may not fit in memory
            h.update(chunk)
    return h.hexdigest()


def write_manifest(tmp: Path, known: dict[str, tuple[int, str]] | None = None) -> None:
    """Write ``tmp/manifest.json``: the size and SHA-256 of every other file in ``tmp``.
    ``known``: ``{name: (size, sha256)}`` hashed while the files were written (:class:`Writer`),
    used when the size still matches; any other file (another rank's) is read and hashed."""
    known = known or {}
    entries = {}
    for f in sorted(f for f in tmp.iterdir() if f.is_file() and f.name != MANIFEST):
        size = f.stat().st_size
        seen = known.get(f.name)
        digest = seen[1] if seen is not None and seen[0] == size else sha256(f)
        entries[f.name] = {"size": size, "sha256": digest}
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": entries}, indent=1))
    fsync(tmp / MANIFEST)


class Writer:
    """Writes the files of a checkpoint directory, each flushed to the disk (fsync'd), hashing
    the bytes on their way out, so that :func:`write_manifest` need not read them back
    (``hashed``: ``{name: (size, sha256)}``). The on-disk formats are the usual ones:
    ``torch.save`` writes through a file object that hashes what passes, JSON is hashed as
    bytes, and safetensors up to :attr:`IN_MEMORY` bytes are serialised in memory, hashed and
    written once (larger ones, e.g. a multi-GB full fine-tune, are written by ``save_file``
    and hashed from the file: an in-memory copy would double the host memory a save needs)."""

    IN_MEMORY = 1 << 30

    def __init__(self, folder: Path):
        self.folder = folder
        self.hashed: dict[str, tuple[int, str]] = {}

    def torch(self, obj, name: str) -> None:
        with open(self.folder / name, "wb") as f:
            out = _HashingFile(f)
            try:
                torch.save(obj, out)
            except RuntimeError:  # torch's writer hides why a write failed ("unexpected pos")
                if out.error is not None:
                    raise out.error from None  # e.g. ENOSPC: the caller reports a full disk
                raise
            self._done(f, name, out.size, out.hash)

    def bytes(self, data: bytes, name: str) -> None:
        with open(self.folder / name, "wb") as f:
            f.write(data)
            self._done(f, name, len(data), hashlib.sha256(data))

    def safetensors(self, tensors: dict, name: str) -> None:
        if sum(t.nbytes for t in tensors.values()) > self.IN_MEMORY:
            save_file(tensors, str(self.folder / name))
            fsync(self.folder / name)
            return
        self.bytes(save(tensors), name)

    def _done(self, f, name: str, size: int, h) -> None:
        f.flush()
        try:
            os.fsync(f.fileno())
        except OSError:  # (file systems that refuse fsync: best effort, as fsync())
            pass
        self.hashed[name] = (size, h.hexdigest())


class _HashingFile:
    """A write-only file object that passes bytes to ``f`` and hashes them on the way."""

    def __init__(self, f):
        self.f, self.hash, self.size = f, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, b) -> int:
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = e
            raise
        self.hash.update(b)
        self.size += len(b) if isinstance(b, bytes) else memoryview(b).nbytes
        return n

    def flush(self) -> None:
        self.f.flush()

    @property
    def name(self) -> str:  # the file's path, as a real file object has it
        return self.f.name


def verify(path: Path) -> None:
    """Raise :class:`ConfigError` naming the damaged file unless checkpoint ``path`` is intact."""
    bad = problem(path)
    if bad is not None:
        raise ConfigError(
            f"checkpoint {path}: {bad}; resume from an intact checkpoint (resume=auto takes "
            "the newest one that verifies)"
        )


def read(path: Path, name: str, kind: str = "torch"):
    """One file of checkpoint ``path``: a ``.pt`` file through the weights-only unpickler, JSON,
    or safetensors. Unreadable or unsafe content is bad input naming the file."""
    f = path / name
    try:
        if kind == "json":
            return json.loads(f.read_text())
        if kind == "safetensors":
            return load_file(str(f))
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(f, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's weights-only unpickler said no
        raise ConfigError(
            f"checkpoint {path}: {name} was refused by the weights-only loader ({_gist(e)}): it "
            "is damaged, or holds more than tensors and plain data (unpickling that could run "
            "code); resume from an intact checkpoint written by mixtune"
        ) from None
    except FileNotFoundError:
        raise ConfigError(
            f"checkpoint {path}: {name} is missing; resume from an intact checkpoint"
        ) from None
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as e:
        raise ConfigError(
            f"checkpoint {path}: {name} is unreadable ({type(e).__name__}: {_gist(e)}); resume "
            "from an intact checkpoint"
        ) from None


def _gist(e: Exception) -> str:
    """The first sentence of an error that says something, without torch's boilerplate."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(e).splitlines()]
    lines = [ln.removeprefix("WeightsUnpickler error:").strip() for ln in lines]
    said = [ln for ln in lines if ln and not ln.startswith(boiler)]
    return said[0].split(". ")[0].rstrip(".") if said else "no details"
