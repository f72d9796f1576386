"""Readers behind streaming datasets: JSONL shards (own reader) and ``datasets`` streams.

A source reads ``n`` raw records from a position and returns the records, the position after
them and whether the epoch ended; positions are small JSON-able values (a shard index and byte
offset, or a ``datasets`` IterableDataset ``state_dict``), which makes exact resume cheap.
"""

from __future__ import annotations

import copy
import glob
import gzip
import json
import logging
from itertools import islice
from pathlib import Path

import numpy as np

from mixtune.data.sources import hostile, is_saved, load_saved
from mixtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)
HUB_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json"}


class JsonlSource:
    """Non-blank lines of JSONL shards; a position is ``[shard in this epoch's order, byte]``."""

    def __init__(self, shards: list[Path], where: str, key: tuple, shuffle: bool):
        self.shards, self.where, self.key, self.shuffle = shards, where, key, shuffle
        self.files = list(shards)  # what the stream reads, for the run's fingerprint
        self._f = None  # (shard, open file)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle or len(self.shards) == 1:
            return list(range(len(self.shards)))
        return (
            np.random.default_rng([*self.key, 0x5348, epoch]).permutation(len(self.shards)).tolist()
        )

    def count(self) -> int:
        n = 0
        for p in self.shards:
            with _open(p) as f:
                n += sum(1 for line in f if line.strip())
        return n

    def read(self, epoch: int, pos, n: int) -> tuple[list[dict], list, bool]:
        order, (i, off) = self.order(epoch), pos or (0, 0)
        out: list[dict] = []
        while len(out) < n and i < len(order):
            f = self._seek(order[i], off)
            while len(out) < n:
                start = f.tell()
                line = f.readline()
                if not line:
                    break
                if line.strip():
                    out.append(self._parse(line, order[i], start))
            off = f.tell()
            if len(out) < n:  # shard finished
                i, off = i + 1, 0
        return out, [i, off], len(out) < n

    def _seek(self, shard: int, off: int):
        if self._f is None or self._f[0] != shard or self._f[1].tell() != off:
            if self._f is not None:
                self._f[1].close()
            f = _open(self.shards[shard])
            f.seek(off)
            self._f = (shard, f)
        return self._f[1]

    def _parse(self, line: bytes, shard: int, start: int) -> dict:
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(
                f"{self.where}: {self.shards[shard]} (byte {start}): malformed JSON "
                f"({e}); each line must be one JSON object"
            ) from None
        except (RecursionError, ValueError) as e:  # nested too deeply, or a too-long integer
            raise DataError(
                f"{self.where}: {self.shards[shard]} (byte {start}): {hostile(e)}"
            ) from None
        if not isinstance(rec, dict):
            raise DataError(
                f"{self.where}: {self.shards[shard]} (byte {start}): expected a "
                f"JSON object, got {type(rec).__name__}"
            )
        return rec


class HubSource:
    """A ``datasets`` IterableDataset; a position is its ``state_dict()`` (None: epoch start)."""

    def __init__(self, factory, where: str, split: str = "train", size: int | None = None):
        self.factory, self.where, self.split, self.size = factory, where, split, size
        # The local files the stream reads (set by open_source), for the run's fingerprint;
        # empty for a hub dataset (its first block is all the fingerprint holds of it).
        self.files: list[Path] = []
        self._ds = self._it = self._at = None

    def count(self) -> int:
        if self.size is not None:
            return self.size
        splits = getattr(self.factory().info, "splits", None)
        if splits and self.split in splits and splits[self.split].num_examples:
            return int(splits[self.split].num_examples)
        log.warning("%s: size unknown; counting the stream once", self.where)
        return sum(1 for _ in self.factory())

    def read(self, epoch: int, pos, n: int) -> tuple[list[dict], dict, bool]:
        if self._it is None or self._at != (epoch, pos):
            self._ds = self.factory()
            if pos is None:
                self._ds.set_epoch(epoch)
            else:
                self._ds.load_state_dict(copy.deepcopy(pos))
            self._it = iter(self._ds)
        out = [dict(r) for r in islice(self._it, n)]
        end = copy.deepcopy(self._ds.state_dict())
        self._at = (epoch, end)
        return out, end, len(out) < n


def open_source(d, where: str, key: tuple, shuffle: bool):
    """A :class:`JsonlSource` for JSONL files/globs/directories, else a :class:`HubSource`."""
    path = d.path
    if path.startswith("builtin:"):
        raise ConfigError(
            f"{where}.streaming: built-in domains are small and in memory; set streaming: false"
        )
    p = Path(path).expanduser()
    if any(c in path for c in "*?["):
        shards = [Path(x) for x in sorted(glob.glob(str(p)))]
        if not shards:
            raise DataError(f"{where}: no file matches '{path}'")
        return JsonlSource(shards, where, key, shuffle)
    if p.is_dir():
        shards = sorted(x for x in p.iterdir() if _is_jsonl(x))
        if shards:
            return JsonlSource(shards, where, key, shuffle)
        if is_saved(p):
            ds = load_saved(p, d.split, where)  # streamed from its memory-mapped Arrow files
            source = HubSource(lambda: ds.to_iterable_dataset(), where, d.split, size=len(ds))
        else:
            source = _hub(where, d.split, str(p), d.subset)
        source.files = _files_under(p)
        return source
    if _is_jsonl(p):
        if not p.is_file():
            raise DataError(f"{where}: file not found: {p}")
        return JsonlSource([p], where, key, shuffle)
    if p.suffix in HUB_BUILDERS:
        if not p.is_file():
            raise DataError(f"{where}: file not found: {p}")
        source = _hub(where, "train", HUB_BUILDERS[p.suffix], data_files=str(p))
        source.files = [p]
        return source
    return _hub(where, d.split, path, d.subset)


def _hub(where: str, split: str, *args, **kw) -> HubSource:
    import datasets

    def factory():
        try:
            return datasets.load_dataset(*args, split=split, streaming=True, **kw)
        except Exception as e:
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            raise DataError(
                f"{where}: cannot stream '{args[0]}' with `datasets` ({type(e).__name__}: {msg})"
            ) from None

    return HubSource(factory, where, split)


def _files_under(root: Path) -> list[Path]:
    """Every file under ``root``, sorted, leaving out hidden ones (``.git``, ``.cache``)."""
    found = (x for x in root.rglob("*") if x.is_file())
    return sorted(x for x in found if not any(s.startswith(".") for s in x.relative_to(root).parts))


def _is_jsonl(p: Path) -> bool:
    return p.name.endswith(".jsonl") or p.name.endswith(".jsonl.gz")


def _open(p: Path):
    return gzip.open(p, "rb") if p.name.endswith(".gz") else open(p, "rb")
