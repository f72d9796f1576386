"""Streaming training datasets as the loop sees them: built from the config, duck-typing TrainSet.

:func:`build` is :func:`mixtune.data.domains.build` with the ``streaming: true`` datasets
opened as :class:`StreamSet` (:func:`open_stream`: the source, the tokenisation of a block and
the size); :func:`streams_of` hands their :class:`~mixtune.data.streaming.stream.Stream` to the
sampler, :func:`lengths` gives per-example input lengths and :func:`content_digest` a hash of
the examples, for either kind of dataset.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from mixtune.data import domains as data_domains
from mixtune.data.formats import detect, normalize
from mixtune.data.streaming.sources import open_source
from mixtune.data.streaming.stream import Stream
from mixtune.data.tokenize import Tokenized, digest, resolve_template, tokenize
from mixtune.errors import DataError, MixtuneError

CHUNK = 256  # records per block without a shuffle buffer


class _Column:
    """``column[seq]`` (or an array of seqs) of a stream's buffered examples."""

    def __init__(self, stream: Stream, name: str, field: int, total=None):
        self.stream, self.name, self.field, self.total = stream, name, field, total

    def __getitem__(self, e):
        if np.ndim(e):
            return np.array([self[int(x)] for x in np.asarray(e)])
        try:
            return self.stream.cache[int(e)][self.field]
        except KeyError:
            raise MixtuneError(
                f"datasets.{self.name}: example {int(e)} of the stream is no longer "
                "buffered (streaming datasets have no random access)"
            ) from None

    def __setitem__(self, e, value):
        raise MixtuneError(f"datasets.{self.name}: a streaming dataset cannot replace examples")

    def sum(self) -> int:
        """The estimated total (size x mean of the first block) for label counts."""
        return self.total


class StreamSet:
    """A training dataset read from a :class:`Stream` (duck-types ``data.domains.TrainSet``)."""

    def __init__(self, name: str, stream: Stream, repeat: bool, size: int):
        self.name, self.stream, self.repeat, self.size = name, stream, repeat, size
        first = stream.loaded(0)
        counts = [stream.cache[first.head[4] + i][4] for i in range(first.n)]
        tokens = round(size * float(np.mean(counts))) if counts else 0
        self.data = SimpleNamespace(
            input_ids=_Column(stream, name, 0),
            labels=_Column(stream, name, 1),
            prompt_len=_Column(stream, name, 2),
            answers=_Column(stream, name, 3),
            n_truncated=0,
            n_dropped=0,
        )
        self.label_counts = _Column(stream, name, 4, tokens)
        self.lengths = _Column(stream, name, 5)


# ----------------------------------------------------------------------------------------------
def build(cfg, tokenizer) -> tuple[list, list]:
    """Like :func:`mixtune.data.domains.build`, with streaming datasets read lazily."""
    if not any(d.streaming for d in cfg.datasets):
        return data_domains.build(cfg, tokenizer)
    # domains.build reads only these fields: give it the in-memory datasets and every eval
    rest = SimpleNamespace(
        model=cfg.model,
        train=cfg.train,
        seed=cfg.seed,
        evals=cfg.evals,
        datasets=tuple(d for d in cfg.datasets if not d.streaming),
    )
    mem, evals = data_domains.build(rest, tokenizer)
    held = {t.name: t for t in mem}
    template = resolve_template(tokenizer, cfg.model.chat_template)
    train = [
        open_stream(d, k, cfg.seed, tokenizer, template, cfg.train.max_length)
        if d.streaming
        else held[d.name]
        for k, d in enumerate(cfg.datasets)
    ]
    return train, evals


def streams_of(train_sets: list) -> dict:
    """``{dataset index: Stream}`` for the sampler."""
    return {k: t.stream for k, t in enumerate(train_sets) if isinstance(t, StreamSet)}


def lengths(train_set) -> object:
    """Input lengths per example: an array, or a stream's column."""
    if isinstance(train_set, StreamSet):
        return train_set.lengths
    return np.array([len(x) for x in train_set.data.input_ids])


def content_digest(train_set) -> str:
    """A hash of what a training dataset holds (:func:`mixtune.data.tokenize.digest`): every
    selected example in memory; for a stream, its first block (tokenising all of it is what
    streaming avoids; its size is recorded next to the digest, and the bytes of its files are
    hashed whole from :func:`content_files`)."""
    if isinstance(train_set, StreamSet):
        stream = train_set.stream
        first = stream.loaded(0)
        rows = [stream.cache[first.head[4] + i] for i in range(first.n)]
        return digest([r[0] for r in rows], [r[1] for r in rows], [r[3] for r in rows])
    data = train_set.data
    return digest(data.input_ids, data.labels, data.answers)


def content_files(train_set) -> list[tuple[str, Path]]:
    """The local files a streaming dataset reads, in reading order and named by position (so
    a moved dataset with the same bytes is the same content); empty for an in-memory dataset
    (:func:`content_digest` covers all of it) and for a hub stream."""
    if not isinstance(train_set, StreamSet):
        return []
    return [(str(i), f) for i, f in enumerate(getattr(train_set.stream.source, "files", []))]


def open_stream(d, k: int, seed: int, tokenizer, template: str, max_len: int) -> StreamSet:
    where = f"datasets.{d.name}"
    source = open_source(d, where, (seed, k), d.shuffle_buffer > 0)
    fmt = [d.format]

    def tokenise(recs: list[dict]):
        if not recs:
            return Tokenized()
        if fmt[0] == "auto":  # detected once, from the stream's first record
            found = detect(
                {**recs[0], **{t: recs[0][s] for t, s in (d.fields or {}).items() if s in recs[0]}}
            )
            fmt[0] = found if found != "unknown" else "auto"  # normalize raises the error
        examples = normalize(recs, fmt[0], d.fields, where)
        quiet = logging.getLogger("mixtune.data.tokenize")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # per-block drop warnings would flood the log
        try:
            return tokenize(examples, tokenizer, max_len, template, where)
        except DataError as e:
            if "no example has a response token" in str(e):
                return Tokenized()  # every record of this block is too long: skip the block
            raise
        finally:
            quiet.setLevel(level)

    size = source.count()
    if d.max_examples is not None:
        size = min(size, d.max_examples)
    if size == 0:
        raise DataError(f"{where}: '{d.path}' has no records; an empty dataset cannot be used")
    stream = Stream(
        source, k, seed, d.shuffle_buffer or CHUNK, d.shuffle_buffer > 0, tokenise, d.max_examples
    )
    return StreamSet(d.name, stream, d.repeat, size)
