"""Training datasets and evaluation domains, built from the config and tokenised.

Training datasets (what the mixture is over) and evaluation domains (what is measured: targets,
constraints, monitors) are separate lists; an evaluation domain reads its own source or holds
out part of a training dataset, whose held-out examples are then never trained on.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mixtune.config import DatasetConfig, EvalConfig, RunConfig
from mixtune.data.formats import Example, normalize
from mixtune.data.sources import read_records
from mixtune.data.tokenize import Tokenized, resolve_template, tokenize
from mixtune.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class TrainSet:
    name: str
    data: Tokenized
    repeat: bool
    label_counts: np.ndarray  # supervised tokens per example

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class EvalDomain:
    name: str
    role: str  # target | constraint | monitor
    metric: str  # loss | accuracy
    reference: float | None
    data: Tokenized  # the fixed evaluation examples, in batch order
    batch_size: int
    accuracy: bool  # generate and score exact match
    max_new_tokens: int

    @property
    def n_batches(self) -> int:
        return -(-len(self.data) // self.batch_size)


RecordsHook = Callable[[str, list[dict]], None]
"""``hook(where, records)``: sees a source's raw records before they are normalised."""


def build(
    cfg: RunConfig, tokenizer, on_records: RecordsHook | None = None
) -> tuple[list[TrainSet], list[EvalDomain]]:
    """Read, split, budget and tokenise every dataset and evaluation domain.

    Each tokenised training dataset gets an INFO line (examples, time): on a real dataset this
    is the long silent part before training starts. ``on_records`` is for tools that
    describe the raw data (``mixtune inspect``: format and record counts) without reading it
    a second time.
    """
    template = resolve_template(tokenizer, cfg.model.chat_template)
    max_len = cfg.train.max_length
    examples = {d.name: _load(d, f"datasets.{d.name}", on_records) for d in cfg.datasets}
    order = {d.name: _perm(cfg.seed, d.name, len(examples[d.name])) for d in cfg.datasets}
    taken = {d.name: 0 for d in cfg.datasets}

    evals = []
    for e in cfg.evals:
        where = f"evals.{e.name}"
        if e.from_dataset is not None:
            pool, idx = examples[e.from_dataset], order[e.from_dataset]
            n = int(e.holdout) if e.holdout >= 1 else max(1, round(e.holdout * len(pool)))
            start = taken[e.from_dataset]
            if start + n >= len(pool):
                raise DataError(
                    f"{where}: holding out {n} of {len(pool)} examples of '{e.from_dataset}' "
                    "leaves nothing to train on; lower holdout"
                )
            exs = [pool[i] for i in idx[start : start + n]]
            taken[e.from_dataset] = start + n
        else:
            exs = _load(e, where, on_records)
            exs = [exs[i] for i in _perm(cfg.seed, "eval:" + e.name, len(exs))]
        limit = e.batches * e.batch_size
        if e.max_examples is not None:
            limit = min(limit, e.max_examples)
        exs = exs[:limit]
        if not exs:
            raise DataError(f"{where}: evaluation domain has no data; check its source")
        has_answers = all(x.answer is not None for x in exs)
        if e.accuracy and not has_answers:
            raise DataError(
                f"{where}: accuracy: true but records have no '{e.answer_field}' "
                "or response to compare against"
            )
        t0 = time.perf_counter()
        tok = tokenize(exs, tokenizer, max_len, template, where, cache=True)
        _report(tok, where, max_len, time.perf_counter() - t0)
        evals.append(
            EvalDomain(
                name=e.name,
                role=e.role,
                metric=e.metric,
                reference=e.reference,
                data=tok,
                batch_size=e.batch_size,
                accuracy=has_answers if e.accuracy is None else e.accuracy,
                max_new_tokens=e.max_new_tokens,
            )
        )
        if e.metric == "accuracy" and not evals[-1].accuracy:
            raise DataError(f"{where}: metric 'accuracy' needs reference answers in the records")

    train = []
    for d in cfg.datasets:
        where = f"datasets.{d.name}"
        keep = order[d.name][taken[d.name] :]
        if d.max_examples is not None:
            keep = keep[: d.max_examples]
        t0 = time.perf_counter()
        exs = [examples[d.name][i] for i in keep]
        tok = tokenize(exs, tokenizer, max_len, template, where, cache=True)
        _report(tok, where, max_len, time.perf_counter() - t0)
        train.append(TrainSet(d.name, tok, d.repeat, tok.label_counts))
    return train, evals


def _load(
    src: DatasetConfig | EvalConfig, where: str, on_records: RecordsHook | None = None
) -> list[Example]:
    records = read_records(src.path, src.split, src.subset, where)
    if not records:
        raise DataError(f"{where}: '{src.path}' has no records; an empty dataset cannot be used")
    if on_records is not None:
        on_records(where, records)
    answer_field = getattr(src, "answer_field", "answer")
    return normalize(records, src.format, src.fields, where, answer_field)


def _perm(seed: int, name: str, n: int) -> np.ndarray:
    return np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(n)


def _report(tok: Tokenized, where: str, max_len: int, seconds: float) -> None:
    # Training datasets are the big ones; evaluation domains hold a few batches (DEBUG).
    level = logging.INFO if where.startswith("datasets.") else logging.DEBUG
    log.log(level, "%s: %d examples tokenised in %.1f s", where, len(tok), seconds)
    if tok.n_truncated:
        log.warning(
            "%s: %d of %d examples truncated to max_length=%d",
            where,
            tok.n_truncated,
            len(tok) + tok.n_dropped,
            max_len,
        )
