"""MixtureDataset: mixtune's sampler as the ``train_dataset`` of a Hugging Face ``Trainer``.

The user's per-domain datasets (tokenised examples: ``input_ids`` and optional ``labels`` with
-100 on positions not to learn) are concatenated behind a :class:`MixtureSampler`. The dataset
is a ``torch.utils.data.IterableDataset`` that yields the examples of global batch 0, 1, 2, ...
in order; batch ``b`` (the batch of optimizer step ``b + 1``) is drawn with the weights in effect
at ``b``. The weights are a *schedule* ``[(from_batch, weights), ...]``: :class:`MixtureCallback`
appends to it, and the stream is a pure function of (seed, schedule). That makes it

- deterministic: the same seed and weight history give the same examples;
- resumable: HF ``Trainer`` resumes an iterable dataset by re-reading and discarding the batches
  already trained on; the callback restores the schedule first, so the replay is exact;
- rank-consistent: every rank can recompute any batch (the loss ledger of the callback does).

Why an iterable dataset and not a ``Sampler``: ``Trainer`` takes a custom sampler only through a
subclass (``_get_train_sampler``), and TRL's ``SFTTrainer`` would need another one; an iterable
``train_dataset`` needs no subclass. The cost is that ``dataloader_num_workers`` must be 0 (the
weights live in the main process; tokenised data makes workers unnecessary anyway).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from mixtune import simplex
from mixtune.data.collate import collate
from mixtune.data.domains import TrainSet
from mixtune.data.sampler import MixtureSampler
from mixtune.data.tokenize import IGNORE, Tokenized
from mixtune.errors import DataError, MixtuneError
from mixtune.mixers.base import DatasetInfo

_KEEP = 8  # drawn batches kept for the loss ledger (the data loader reads ahead by one)


def _part(name: str, examples) -> TrainSet:
    """Tokenised examples of one dataset as numpy arrays, in mixtune's training-set layout."""
    ids, labels = [], []
    for i in range(len(examples)):
        ex = examples[i]
        if not isinstance(ex, Mapping) or "input_ids" not in ex:
            raise DataError(f"dataset '{name}' example {i}: expected a mapping with 'input_ids'")
        x = np.asarray(ex["input_ids"], np.int64)
        y = np.asarray(ex["labels"], np.int64) if ex.get("labels") is not None else x.copy()
        if x.ndim != 1 or len(x) == 0 or y.shape != x.shape:
            raise DataError(
                f"dataset '{name}' example {i}: input_ids must be a non-empty 1-D "
                f"sequence and labels the same length"
            )
        ids.append(x)
        labels.append(y)
    if not ids:
        raise DataError(f"dataset '{name}': no examples")
    counts = np.array([int((y[1:] != IGNORE).sum()) for y in labels], np.int64)
    return TrainSet(name, Tokenized(input_ids=ids, labels=labels), repeat=True, label_counts=counts)


class MixtureDataset(torch.utils.data.IterableDataset):
    """An endless stream of examples drawn from ``datasets`` with mixtune's sampler.

    Args:
        datasets: ``{name: examples}``; examples is any indexable of mappings with ``input_ids``
            and optionally ``labels`` (a ``datasets.Dataset`` works).
        seed: the sampler's seed (which examples each step sees).
        pad_token_id: used by :meth:`collate` and by look-ahead mini-batches.
        weights: initial weights (dataset order or ``{name: w}``); default uniform. The mixer's
            first proposal replaces them before training starts.
    """

    def __init__(
        self, datasets: Mapping[str, Sequence], seed: int = 0, pad_token_id: int = 0, weights=None
    ):
        if not datasets:
            raise MixtuneError("MixtureDataset: needs at least one dataset")
        self.parts = [_part(str(n), ex) for n, ex in datasets.items()]
        self.names = [p.name for p in self.parts]
        self.sizes = [p.size for p in self.parts]
        self.seed = int(seed)
        self.pad_token_id = int(pad_token_id)
        w = np.full(len(self.names), 1 / len(self.names)) if weights is None else weights
        self.schedule: list[tuple[int, np.ndarray]] = [(0, simplex.validate(w, self.names))]
        # Global examples per optimizer step, set by the callback; until then (a trainer peeking
        # at the first example) the stream draws one example per batch.
        self.batch_size: int | None = None
        self._sampler: MixtureSampler | None = None
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def infos(self) -> list[DatasetInfo]:
        return [DatasetInfo(p.name, p.size, int(p.label_counts.sum())) for p in self.parts]

    @property
    def weights(self) -> np.ndarray:
        """The latest weights of the schedule."""
        return self.schedule[-1][1]

    @property
    def drawn(self) -> int:
        """Global batches drawn so far by the stream (the data loader reads ahead)."""
        return 0 if self._sampler is None else self._sampler.step

    def weights_at(self, b: int) -> np.ndarray:
        w = self.schedule[0][1]
        for start, ws in self.schedule:
            if start > b:
                break
            w = ws
        return w

    def set_weights(self, weights, from_batch: int) -> None:
        """Use ``weights`` for global batches ``from_batch`` and later."""
        w = simplex.validate(weights, self.names, what="mixture weights")
        if from_batch < self.drawn:
            raise MixtuneError(
                f"MixtureDataset: weights for batch {from_batch} arrive after the data loader "
                f"drew batch {self.drawn - 1}; set dataloader_num_workers=0 and do not wrap "
                "the dataset (the loader may read ahead by one batch only)"
            )
        if from_batch < self.schedule[-1][0]:
            raise MixtuneError(
                f"MixtureDataset: weights must be set in step order, got batch "
                f"{from_batch} after {self.schedule[-1][0]}"
            )
        if from_batch == self.schedule[-1][0]:
            self.schedule[-1] = (from_batch, w)
        else:
            self.schedule.append((from_batch, w))

    # ------------------------------------------------------------------------------------------
    def batch(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Global batch ``b``: ``(dataset_ids, example_ids)``, each (batch_size,)."""
        if b in self._cache:
            return self._cache[b]
        if self._sampler is None or b < self._sampler.step:
            self._restart()  # replay from batch 0: the stream is a function of the schedule
        s = self._sampler
        while s.step <= b:
            w = self.weights_at(s.step)
            if not np.array_equal(w, s.weights):
                s.set_weights(w)
            b_new = s.step
            self._cache[b_new] = s.next_batch(self.batch_size or 1)
            self._cache.pop(b_new - _KEEP, None)
        return self._cache[b]

    def start(self, batch_size: int) -> None:
        """Set the global batch size (examples per optimizer step) and rewind the stream."""
        self.batch_size = int(batch_size)
        self._sampler, self._cache = None, {}

    def example(self, k: int, e: int) -> dict:
        p = self.parts[k]
        return {"input_ids": p.data.input_ids[e].tolist(), "labels": p.data.labels[e].tolist()}

    def __iter__(self):
        if torch.utils.data.get_worker_info() is not None:
            raise MixtuneError(
                "MixtureDataset: set dataloader_num_workers=0 (the mixture "
                "weights change in the main process during training)"
            )
        self._restart()
        b = 0
        while True:
            ds, ex = self.batch(b)
            for k, e in zip(ds.tolist(), ex.tolist()):
                yield self.example(k, e)
            b += 1

    def _restart(self) -> None:
        self._sampler = MixtureSampler(self.sizes, self.names, self.schedule[0][1], self.seed)
        self._cache = {}

    # ------------------------------------------------------------------------------------------
    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Right-pad a list of examples (``data_collator=mix.collate`` for a plain Trainer)."""
        return collate(
            [np.asarray(x["input_ids"]) for x in examples],
            [np.asarray(x.get("labels", x["input_ids"])) for x in examples],
            self.pad_token_id,
        )

    def as_hf_dataset(self):
        """The same stream as a ``datasets.IterableDataset`` (what TRL's ``SFTTrainer`` takes)."""
        import datasets

        return datasets.IterableDataset.from_generator(_Generate(self))

    def state_dict(self) -> dict:
        return {
            "names": list(self.names),
            "sizes": list(self.sizes),
            "seed": self.seed,
            "schedule": [[int(b), w.tolist()] for b, w in self.schedule],
        }

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names or state["sizes"] != self.sizes:
            raise MixtuneError(
                f"mixture state is for datasets {state['names']} of sizes "
                f"{state['sizes']}, not {self.names} of sizes {self.sizes}"
            )
        self.seed = int(state["seed"])
        self.schedule = [(int(b), simplex.validate(w, self.names)) for b, w in state["schedule"]]
        self._sampler, self._cache = None, {}


class _Generate:
    """Generator function for ``datasets.IterableDataset.from_generator`` (picklable)."""

    def __init__(self, mix: MixtureDataset):
        self.mix = mix

    def __call__(self):
        yield from iter(self.mix)
