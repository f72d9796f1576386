"""Streaming training datasets: read lazily, tokenised on the fly, resumed exactly.

``datasets[].streaming: true`` reads a dataset a *block* at a time instead of loading it:
a JSONL file, a glob or a directory of JSONL shards (``.jsonl``/``.jsonl.gz``, read in sorted
order), or through ``datasets.load_dataset(..., streaming=True)`` (a hub name, a directory
without JSONL shards, a local ``.parquet``/``.csv``/``.json`` file). Memory holds one block plus
one step's examples, whatever the size of the dataset.

The :class:`~mixtune.data.sampler.MixtureSampler` still chooses the dataset of every slot by
the weights; a stream then hands out its next examples in stream order. A block is ``block``
records read from the current position, normalised, tokenised and, with ``shuffle_buffer: N``,
permuted by a generator seeded by ``(seed, dataset, epoch, block)`` (JSONL shard order is then
also permuted per epoch). A block covering the whole dataset is permuted exactly like the
in-memory sampler's pass, so such a stream gives the same batches as the in-memory path over
a file holding the examples in that path's order. Example ids are stream sequence numbers.

Exact resume: the state is the current block's coordinates (epoch, block index, where it starts:
JSONL shard and byte offset, or the ``datasets`` iterator state; records read before it; first
sequence number) and the position inside it; the block is re-read and re-permuted on load.
``repeat: false`` ends the stream after one epoch: the sampler reads ahead to see what is left.

Distributed: every rank reads and tokenises the same stream and takes its shard of the global
batch, as in memory (simple and exact; the read and tokenisation cost is paid on every rank).

Features needing random access to the examples (methods that declare ``random_access`` in
their ``requires``, e.g. CADFT rewriting or DynamixSFT's ``reward: progress``, and held-out eval
domains, ``from_dataset``) are refused when the config loads; look-ahead, gradient alignment and
probing work (drawn from / run on the stream's current block, restored exactly).
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from mixtune.data import domains as data_domains
from mixtune.data.formats import detect, normalize
from mixtune.data.stream_sources import HubSource, JsonlSource, open_source
from mixtune.data.tokenize import Tokenized, resolve_template, tokenize
from mixtune.errors import DataError, MixtuneError
from mixtune.losses.core import IGNORE

log = logging.getLogger(__name__)
__all__ = [
    "HubSource",
    "JsonlSource",
    "Stream",
    "StreamSet",
    "build",
    "lengths",
    "open_source",
    "open_stream",
    "streams_of",
]
CHUNK = 256  # records per block without a shuffle buffer


@dataclass
class Block:
    head: list  # [epoch, index, start position, records read before it, first sequence number]
    n: int  # examples (after tokenisation) in the block
    end: object  # source position after it
    read_end: int  # records read in the epoch after it
    done: bool  # the epoch ends with this block


class Stream:
    """One streaming dataset: blocks read, tokenised, permuted and handed out in order."""

    def __init__(
        self,
        source,
        k: int,
        seed: int,
        block: int,
        shuffle: bool,
        tokenise,
        limit: int | None = None,
    ):
        self.source, self.k, self.seed, self.block = source, k, seed, block
        self.shuffle, self.tokenise, self.limit = shuffle, tokenise, limit
        self.cache: dict[int, tuple] = {}  # seq -> (ids, labels, prompt_len, answer, count, len)
        self.ahead: deque[Block] = deque()  # loaded blocks; ahead[0] is the current one
        self.head, self.pos = [0, 0, None, 0, 0], 0

    def take(self, n: int, repeat: bool) -> np.ndarray:
        """Sequence numbers of the next ``n`` examples (the caller checked what is left)."""
        for s in [s for s in self.cache if s < self._loaded(0).head[4]]:
            del self.cache[s]  # handed out at an earlier step: no longer needed
        out: list[np.ndarray] = []
        idle_epochs = 0  # epochs ended without handing anything out
        while n > 0:
            b = self._loaded(0)
            if self.pos == b.n:
                if b.done and not repeat:
                    raise MixtuneError(f"stream {self.k} exhausted (repeat: false)")
                idle_epochs += b.done
                if idle_epochs > 1:
                    raise DataError(
                        f"{self.source.where}: no streamed example has a response "
                        "token within train.max_length"
                    )
                self._next_block(b)
                continue
            idle_epochs = 0
            got = min(n, b.n - self.pos)
            out.append(np.arange(b.head[4] + self.pos, b.head[4] + self.pos + got))
            self.pos, n = self.pos + got, n - got
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def available(self, n: int) -> int:
        """How many of the next ``n`` examples exist before the epoch ends (reads ahead)."""
        have, i = -self.pos, 0
        while True:
            b = self._loaded(i)
            have += b.n
            if have >= n or b.done:
                return max(0, min(n, have))
            i += 1

    def draw(self, n: int, key: int) -> np.ndarray:
        """``n`` ids from the current block (the next non-empty one), keyed by ``key``."""
        i, ends = 0, 0
        while self._loaded(i).n == 0:
            ends += self._loaded(i).done
            if ends > 1:
                raise DataError(f"{self.source.where}: the stream has no trainable example")
            i += 1
        b = self._loaded(i)
        rng = np.random.default_rng([self.seed, 0x6C6B, self.k, int(key)])
        return b.head[4] + rng.choice(b.n, size=n, replace=n > b.n)

    def state_dict(self) -> dict:
        return {"head": copy.deepcopy(self.head), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        if state["head"] != self.head:  # elsewhere: re-read from the block's start
            self.ahead.clear()
            self.cache.clear()
            self.head = copy.deepcopy(state["head"])
        self.pos = int(state["pos"])

    # ------------------------------------------------------------------------------------------
    def _loaded(self, i: int) -> Block:
        while len(self.ahead) <= i:
            prev = self.ahead[-1] if self.ahead else None
            self.ahead.append(self._load(self.head if prev is None else _after(prev)))
        return self.ahead[i]

    def _next_block(self, b: Block) -> None:
        self._loaded(1)
        self.ahead.popleft()
        self.head, self.pos = copy.deepcopy(self.ahead[0].head), 0

    def _load(self, head: list) -> Block:
        epoch, index, start, read, seq = head
        want = self.block if self.limit is None else min(self.block, self.limit - read)
        recs, end, done = self.source.read(epoch, start, want) if want > 0 else ([], start, True)
        done = done or (self.limit is not None and read + len(recs) >= self.limit)
        if done and read + len(recs) == 0:
            raise DataError(f"{self.source.where}: the stream has no records")
        tok = self.tokenise(recs)
        order = np.arange(len(tok))
        if self.shuffle:  # block 0 is keyed like the in-memory sampler's pass permutation
            order = np.random.default_rng(
                [self.seed, 0x7065, self.k, epoch] + ([index] if index else [])
            ).permutation(len(tok))
        for i, j in enumerate(order):
            ids, lab = tok.input_ids[j], tok.labels[j]
            self.cache[seq + i] = (
                ids,
                lab,
                tok.prompt_len[j],
                tok.answers[j],
                int((lab[1:] != IGNORE).sum()),
                len(ids),
            )
        return Block(list(head), len(tok), end, read + len(recs), done)


def _after(b: Block) -> list:
    epoch, index, _, _, seq = b.head
    if b.done:
        return [epoch + 1, 0, None, 0, seq + b.n]
    return [epoch, index + 1, b.end, b.read_end, seq + b.n]


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
        first = stream._loaded(0)
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
