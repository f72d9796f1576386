"""SHA-256 of files' bytes, hashed once per version of a file.

A resume checks that the base model's weights and a streaming dataset's files are what the run
started on (:mod:`mixtune.engine.fingerprint`). Reading a multi-GB model at every start would
cost more than the check is worth, so a file's digest is cached in the cache directory
(``$MIXTUNE_CACHE_DIR/sha256/``, beside the token cache's entries:
:func:`mixtune.data.token_cache.directory`; ``MIXTUNE_CACHE_DIR=off`` hashes every time), keyed
by the file's resolved path, size, ``mtime_ns`` and ``ctime_ns``. Any write changes ``mtime``;
``ctime`` cannot be set by a user, so a file replaced by one of the same size with a copied
``mtime`` (``cp -p``, ``rsync -a``) is hashed again too. A file whose bytes are unchanged (only
touched) hashes to the same digest.

Hashing streams the file in 1 MiB blocks read into one buffer (SHA-256 runs at about 1.3 GB/s
with the CPU's SHA instructions), so memory stays flat whatever the file size. A cache that
cannot be read or written is skipped with a debug line: it never fails a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def _cache_dir() -> Path | None:
    from mixtune.data.token_cache import directory

    where = directory()
    return None if where is None else where / "sha256"


def sha256(path: Path) -> str:
    """The SHA-256 (hex) of ``path``'s bytes, from the cache when the file is unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    where = _cache_dir()
    entry = None
    if where is not None:
        name = hashlib.blake2b(str(path).encode("utf-8", "surrogatepass"), digest_size=16)
        entry = where / f"{name.hexdigest()}.json"
        try:
            cached = json.loads(entry.read_text())
            if cached["stamp"] == stamp:
                return cached["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    digest = _read_hash(path)
    if entry is not None:
        _store(entry, {"stamp": stamp, "sha256": digest})
    return digest


def _read_hash(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _store(entry: Path, record: dict) -> None:
    """Write a cache entry atomically (a temporary file renamed into place)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record))
            os.replace(tmp, entry)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as e:
        log.debug("file hash cache: cannot write %s (%s)", entry, e)


def of_files(files: list[tuple[str, Path]]) -> str:
    """One digest (hex) of several files: each one's name as given, size and SHA-256, in
    order."""
    h = hashlib.sha256()
    for name, p in files:
        h.update(json.dumps([name, p.stat().st_size, sha256(p)]).encode() + b"\n")
    return h.hexdigest()
