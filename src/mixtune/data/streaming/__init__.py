"""Streaming training datasets: read lazily, tokenised on the fly, resumed exactly.

``datasets[].streaming: true`` reads a dataset a *block* at a time instead of loading it:
a JSONL file, a glob or a directory of JSONL shards (``.jsonl``/``.jsonl.gz``, read in sorted
order), or through ``datasets.load_dataset(..., streaming=True)`` (a hub name, a directory
without JSONL shards, a local ``.parquet``/``.csv``/``.json`` file; a ``save_to_disk`` directory
through ``load_from_disk(...).to_iterable_dataset()``). Memory holds one block plus
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

- :mod:`~mixtune.data.streaming.sources`: the readers (JSONL shards, ``datasets`` streams);
- :mod:`~mixtune.data.streaming.stream`: one stream's blocks, their order and its resume state;
- :mod:`~mixtune.data.streaming.dataset`: the training datasets built from the config.
"""

from mixtune.data.streaming.dataset import (
    StreamSet,
    build,
    content_digest,
    content_files,
    lengths,
    open_stream,
    streams_of,
)
from mixtune.data.streaming.sources import HubSource, JsonlSource, open_source
from mixtune.data.streaming.stream import Stream

__all__ = [
    "HubSource",
    "JsonlSource",
    "Stream",
    "StreamSet",
    "build",
    "content_digest",
    "content_files",
    "lengths",
    "open_source",
    "open_stream",
    "streams_of",
]
