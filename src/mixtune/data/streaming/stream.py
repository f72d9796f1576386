"""One streaming dataset as blocks: read from a source, tokenised, permuted, handed out in order.

A block is ``block`` records read from the current position, normalised and tokenised (by the
``tokenise`` callable the dataset gives) and, with a shuffle buffer, permuted by a generator
seeded by ``(seed, dataset, epoch, block)``; block 0 of an epoch is keyed like the in-memory
sampler's pass permutation, so a block covering the whole dataset gives the in-memory batches.
Examples are named by stream sequence numbers; their token columns stay in ``cache`` until a
later step no longer needs them.

Exact resume: the state is the current block's coordinates (``head``: epoch, block index, where
it starts in the source, records read before it, first sequence number) and the position inside
it; on load the block is re-read and re-permuted.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass

import numpy as np

from mixtune.errors import DataError, MixtuneError
from mixtune.losses.core import IGNORE


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
        for s in [s for s in self.cache if s < self.loaded(0).head[4]]:
            del self.cache[s]  # handed out at an earlier step: no longer needed
        out: list[np.ndarray] = []
        idle_epochs = 0  # epochs ended without handing anything out
        while n > 0:
            b = self.loaded(0)
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
            b = self.loaded(i)
            have += b.n
            if have >= n or b.done:
                return max(0, min(n, have))
            i += 1

    def draw(self, n: int, key: int) -> np.ndarray:
        """``n`` ids from the current block (the next non-empty one), keyed by ``key``."""
        i, ends = 0, 0
        while self.loaded(i).n == 0:
            ends += self.loaded(i).done
            if ends > 1:
                raise DataError(f"{self.source.where}: the stream has no trainable example")
            i += 1
        b = self.loaded(i)
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
    def loaded(self, i: int) -> Block:
        """Block ``i`` counted from the current one (0), read ahead as needed."""
        while len(self.ahead) <= i:
            prev = self.ahead[-1] if self.ahead else None
            self.ahead.append(self._load(self.head if prev is None else _after(prev)))
        return self.ahead[i]

    def _next_block(self, b: Block) -> None:
        self.loaded(1)
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
