"""MixtureSampler: which examples each optimizer step sees.

Each step draws a *global* batch of ``n`` (dataset, example) pairs:

1. the dataset of every slot is drawn independently with the current weights (inverse CDF:
   one uniform and a search of the cumulative weights -- a binary search, or for big draws
   over many datasets a guide table with the same result);
2. inside a dataset, examples come without replacement from a permutation of that dataset,
   regenerated from ``(seed, dataset, pass)`` at every new pass, so each pass reshuffles.

The randomness of step ``s`` comes from a generator seeded by ``(seed, s)``, so the stream is
fully determined by the seed, the step and the weight history; ``state_dict`` holds only the
step, the per-dataset cursors and pass counters, and the weights. Every rank draws the same
global batch and takes its own shard with :func:`shard`. Datasets with ``repeat=False`` stop
being drawn once exhausted (their share goes to the others); when nothing is left to draw the
sampler raises :class:`SamplerExhausted`.

A *streamed* dataset (``streams``: dataset index -> :class:`~mixtune.data.streaming.stream.Stream`)
is still chosen by the weights like any other, but hands out its next examples in stream order;
its ids are stream sequence numbers, and its position is part of ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mixtune import simplex

_GUIDE_SCANS = 4  # linear steps inside a guide-table cell before a binary search takes over


class SamplerExhausted(Exception):
    """Every dataset that still has weight is exhausted and may not repeat."""


class MixtureSampler:
    def __init__(
        self,
        sizes: Sequence[int],
        names: Sequence[str],
        weights,
        seed: int = 0,
        repeat: Sequence[bool] | None = None,
        streams: dict | None = None,
    ):
        self.sizes = np.asarray(sizes, dtype=np.int64)
        if np.any(self.sizes <= 0):
            empty = [n for n, s in zip(names, self.sizes) if s <= 0]
            raise ValueError(f"datasets with no examples cannot be sampled: {empty}")
        self.names = list(names)
        self.seed = int(seed)
        self.repeat = np.ones(len(sizes), bool) if repeat is None else np.asarray(repeat, bool)
        self.streams = dict(streams or {})  # dataset index -> Stream; no permutation kept
        held = np.where(np.isin(np.arange(len(sizes)), list(self.streams)), 0, self.sizes)
        self.offsets = np.concatenate([[0], np.cumsum(held)[:-1]])
        self.step = 0
        self.cursors = np.zeros(len(sizes), np.int64)
        self.passes = np.zeros(len(sizes), np.int64)
        self.exhausted = np.zeros(len(sizes), bool)
        self._perm = np.empty(int(held.sum()), np.int64)
        for k in range(len(sizes)):
            self._reshuffle(k)
        self.set_weights(weights)

    # ---------------------------------------------------------------------------------------
    def set_weights(self, weights) -> None:
        """Use ``weights`` (validated simplex point, dataset order or name mapping) from now on."""
        self.weights = simplex.validate(weights, self.names)
        self._refresh_cdf()

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw the next global batch: ``(dataset_ids, example_ids)``, each of shape (n,)."""
        rng = np.random.default_rng([self.seed, 0x6D6978, self.step])
        ds = self._draw_datasets(rng, n)
        ex = self._pick_streamed(ds) if self.streams else self._pick(ds)
        self.step += 1
        return ds, ex

    def _pick(self, ds: np.ndarray) -> np.ndarray:
        """Example ids of in-memory datasets for the slots ``ds``; advances their cursors."""
        n = len(ds)
        ex = np.empty(n, np.int64)
        counts = np.bincount(ds, minlength=len(self.sizes))
        # rank of each slot among the slots of the same dataset (stable: order of appearance);
        # 16-bit keys make numpy's stable argsort a radix sort (same result, O(n))
        keys = ds.astype(np.uint16) if len(self.sizes) <= 1 << 16 else ds
        order = np.argsort(keys, kind="stable")
        starts = np.cumsum(counts) - counts
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n) - starts[ds[order]]
        pos = self.cursors[ds] + rank
        wraps = self.cursors + counts > self.sizes  # datasets whose pass ends inside this batch
        if not wraps.any():  # common case: no dataset wraps around in this batch
            ex[:] = self._perm[self.offsets[ds] + pos]
            self.cursors += counts
        else:  # vectorised for the datasets that do not wrap, one by one for those that do
            wrapping = np.flatnonzero(wraps)
            simple = ~wraps[ds]
            ex[simple] = self._perm[self.offsets[ds[simple]] + pos[simple]]
            moved = counts.copy()
            moved[wrapping] = 0
            self.cursors += moved
            for k in wrapping:
                ex[ds == k] = self._take(k, int(counts[k]))
        return ex

    def _pick_streamed(self, ds: np.ndarray) -> np.ndarray:
        ex = np.empty(len(ds), np.int64)
        mem = ~np.isin(ds, list(self.streams))
        if mem.any():
            ex[mem] = self._pick(ds[mem])
        for k, stream in self.streams.items():
            slots = np.flatnonzero(ds == k)
            if slots.size:  # the stream's next examples, in slot order
                ex[slots] = stream.take(slots.size, bool(self.repeat[k]))
        return ex

    def draw_from(self, k: int, n: int, key: int) -> np.ndarray:
        """``n`` example ids of dataset ``k`` drawn with a separate generator keyed by ``key``.

        Leaves the sampler's state untouched (used for look-ahead reward batches).
        """
        if k in self.streams:  # drawn from the stream's current block, position untouched
            return self.streams[k].draw(n, key)
        rng = np.random.default_rng([self.seed, 0x6C6B, int(k), int(key)])
        size = int(self.sizes[k])
        return rng.choice(size, size=n, replace=n > size)

    # ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        streams = {str(k): s.state_dict() for k, s in self.streams.items()}
        return {
            **({"streams": streams} if streams else {}),
            "step": int(self.step),
            "cursors": self.cursors.tolist(),
            "passes": self.passes.tolist(),
            "exhausted": self.exhausted.tolist(),
            "weights": self.weights.tolist(),
            "names": list(self.names),
            "sizes": self.sizes.tolist(),
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names or state["sizes"] != self.sizes.tolist():
            raise ValueError(
                f"sampler state is for datasets {state['names']} of sizes {state['sizes']}, "
                f"not {self.names} of sizes {self.sizes.tolist()}"
            )
        self.seed = int(state["seed"])
        self.step = int(state["step"])
        self.cursors = np.asarray(state["cursors"], np.int64)
        self.passes = np.asarray(state["passes"], np.int64)
        self.exhausted = np.asarray(state["exhausted"], bool)
        for k in range(len(self.sizes)):
            self._reshuffle(k)
        for k, stream in self.streams.items():
            stream.load_state_dict(state["streams"][str(k)])
        self.set_weights(state["weights"])

    # ---------------------------------------------------------------------------------------
    def _reshuffle(self, k: int) -> None:
        if k in self.streams:
            return
        rng = np.random.default_rng([self.seed, 0x7065, k, int(self.passes[k])])
        a, b = self.offsets[k], self.offsets[k] + self.sizes[k]
        self._perm[a:b] = rng.permutation(int(self.sizes[k]))

    def _refresh_cdf(self) -> None:
        w = np.where(self.exhausted, 0.0, self.weights)
        total = w.sum()
        self._cdf = np.cumsum(w / total) if total > 0 else None
        self._guide = None  # built on first use for these weights

    def _lookup(self, u: np.ndarray) -> np.ndarray:
        """Dataset of each uniform: ``searchsorted(cdf, u, side="right")``, clamped to K - 1.

        Big draws over many datasets go through a guide table instead of a binary search per
        draw (whose unpredictable branches dominate the draw), with the identical result.
        """
        cdf = self._cdf
        if len(u) < 256 or len(cdf) < 8:
            ds = np.searchsorted(cdf, u, side="right")
        else:
            if self._guide is None:
                # M = 2^m >= 4K equal cells of [0, 1); lo[b] = #{cdf <= b / M}. b / M and u * M
                # are exact in binary, so the answer for u lies in [lo[b], lo[b + 1]].
                m = 1 << (4 * len(cdf) - 1).bit_length()
                lo = np.searchsorted(cdf, np.arange(m + 1) / m, side="right")
                self._guide = (
                    m,
                    lo[:-1].copy(),
                    lo[1:].copy(),
                    np.append(cdf, np.inf),
                    int((lo[1:] - lo[:-1]).max()),
                )
            m, lo, hi, padded, widest = self._guide
            b = (u * m).astype(np.int64)
            ds, end = lo[b], hi[b]
            if widest > _GUIDE_SCANS:  # crowded cells (tiny weights): binary search there
                slow = np.flatnonzero(end - ds > _GUIDE_SCANS)
            for _ in range(min(widest, _GUIDE_SCANS)):  # step through the cell's cdf entries
                ds += (padded[ds] <= u) & (ds < end)
            if widest > _GUIDE_SCANS:
                ds[slow] = np.searchsorted(cdf, u[slow], side="right")
        np.minimum(ds, len(self.sizes) - 1, out=ds)  # guard u ~ 1 against rounding in the cdf
        return ds

    def _draw_datasets(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self._cdf is None:
            raise SamplerExhausted(self._exhausted_message())
        ds = self._lookup(rng.random(n))
        # Non-repeating datasets may run out inside this batch: redraw the overflow slots.
        if not self.repeat.all():
            while True:
                counts = np.bincount(ds, minlength=len(self.sizes))
                remaining = np.where(self.repeat, counts, self.sizes - self.cursors)
                for k, stream in self.streams.items():  # a stream knows only by reading ahead
                    if not self.repeat[k]:
                        remaining[k] = stream.available(int(counts[k]))
                over = np.nonzero(counts > remaining)[0]
                if over.size == 0:
                    return ds
                for k in over:
                    slots = np.nonzero(ds == k)[0][int(remaining[k]) :]
                    self.exhausted[k] = True
                    self._refresh_cdf()
                    if self._cdf is None:
                        raise SamplerExhausted(self._exhausted_message())
                    ds[slots] = self._lookup(rng.random(slots.size))
        return ds

    def _take(self, k: int, count: int) -> np.ndarray:
        out = []
        while count > 0:
            size = int(self.sizes[k])
            if self.cursors[k] >= size:
                self.passes[k] += 1
                self.cursors[k] = 0
                self._reshuffle(k)
            c = int(self.cursors[k])
            got = min(count, size - c)
            a = self.offsets[k] + c
            out.append(self._perm[a : a + got].copy())  # a view would see the next reshuffle
            self.cursors[k] += got
            count -= got
        return np.concatenate(out)

    def _exhausted_message(self) -> str:
        left = [n for n, e in zip(self.names, self.exhausted) if not e]
        return (
            "every dataset with non-zero weight is exhausted (repeat: false); datasets left: "
            f"{left or 'none'}. Set repeat: true, raise max_examples, or lower max_steps."
        )


def shard(n_global: int, world: int, rank: int, micro: int) -> list[slice]:
    """Slices of the global batch that ``rank`` processes, one per micro-batch.

    Micro-batch ``m`` of rank ``r`` is ``[(m*world + r)*micro, ... + micro)``: ranks are disjoint
    and together cover the batch.
    """
    per_rank_steps = n_global // (world * micro)
    return [
        slice((m * world + rank) * micro, (m * world + rank + 1) * micro)
        for m in range(per_rank_steps)
    ]


def token_shard(
    lengths: Sequence[int], world: int, rank: int, budget: int, packed: bool
) -> list[np.ndarray]:
    """Positions in the global batch that ``rank`` processes, one array per micro-batch, the
    micro-batches filled by a token budget (``train.micro_batch_tokens``).

    Rank ``r`` takes the ``r``-th contiguous block of ``len(lengths) / world`` examples and cuts
    it, in order, into micro-batches whose tokens stay within ``budget``: packed (``packed``),
    the sum of their lengths; padded, rows x the longest. An example longer than the budget goes
    alone. Every rank must run the same number of forwards (DDP broadcasts buffers at each
    forward, FSDP gathers parameters), so each rank computes every rank's cut -- all ranks know
    the global batch -- and, while it has fewer than the most, halves its micro-batch with the
    most examples (the first of them). A rank's block has at least as many examples as any
    rank's micro-batches, so this always ends, within the budget and deterministically.
    """
    per = len(lengths) // world
    cuts = [_fill(range(r * per, (r + 1) * per), lengths, budget, packed) for r in range(world)]
    most = max(len(c) for c in cuts)
    mine = cuts[rank]
    while len(mine) < most:
        i = max(range(len(mine)), key=lambda j: (len(mine[j]), -j))
        half = (len(mine[i]) + 1) // 2
        mine[i : i + 1] = [mine[i][:half], mine[i][half:]]
    return [np.asarray(m, dtype=np.int64) for m in mine]


def _fill(positions, lengths: Sequence[int], budget: int, packed: bool) -> list[list[int]]:
    """``positions`` in order, cut into micro-batches of at most ``budget`` tokens."""
    out: list[list[int]] = [[]]
    total = longest = 0
    for i in positions:
        n = int(lengths[i])
        cost = total + n if packed else (len(out[-1]) + 1) * max(longest, n)
        if out[-1] and cost > budget:
            out.append([])
            total = longest = 0
        out[-1].append(i)
        total, longest = total + n, max(longest, n)
    return out
