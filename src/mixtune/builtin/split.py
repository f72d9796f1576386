"""Train/eval splits that never overlap, whatever the seed; eval halved into dev and test.

A record's split is a pure function of its domain and its *key* (a hash), never of the seed or
of the order it was drawn in. The key groups records that must stay together: the operands of a
sum (so "What is 3 + 4?" and "Compute 3 + 4." share a split), a word and its definition, or a
normalised prompt. The seed only decides which records are drawn and their order.

``dev`` and ``test`` partition ``eval`` by a second, independent hash of the same key (about
half each), for the DynaMiCS paper's protocol: select a checkpoint on dev, report it on test.
Both lie inside eval, so the base model never trained on either.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

Record = dict
Maker = Callable[[random.Random], tuple[str, Record]]  # rng -> (split key, record)


def in_eval(domain: str, key: str, permille: int) -> bool:
    """Whether ``key`` belongs to the eval split (``permille``/1000 of all keys do)."""
    digest = hashlib.sha256(f"{domain}\0{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < permille


HALVES = ("dev", "test")  # the two halves of eval


def in_test(domain: str, key: str) -> bool:
    """Whether an eval ``key`` belongs to the test half (else dev): a hash independent of
    :func:`in_eval`'s, so each half is a fair sample of eval."""
    digest = hashlib.sha256(f"{domain}\0{key}\0test".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 2 == 1


TRAIN_HALVES = ("train_a", "train_b")  # the two halves of train


def in_train_b(domain: str, key: str) -> bool:
    """Whether a train ``key`` belongs to half ``train_b`` (else ``train_a``): a third
    independent hash. The benchmark base model is pre-trained on ``train_a`` only, so
    ``train_b`` is general data of the same kind that it never saw (``builtin:replay``)."""
    digest = hashlib.sha256(f"{domain}\0{key}\0train_b".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 2 == 1


def stream_of(split: str) -> str:
    """The split a half is drawn from (dev/test: eval; train_a/train_b: train)."""
    return "eval" if split in HALVES else "train" if split in TRAIN_HALVES else split


def in_half(domain: str, key: str, split: str) -> bool:
    """Whether a key of ``stream_of(split)`` belongs to ``split`` (always, for a whole split)."""
    if split in HALVES:
        return in_test(domain, key) == (split == "test")
    if split in TRAIN_HALVES:
        return in_train_b(domain, key) == (split == "train_b")
    return True


def in_split(domain: str, key: str, split: str, permille: int) -> bool:
    """Whether ``key`` belongs to ``split`` (train, eval, or their halves)."""
    if in_eval(domain, key, permille) != (stream_of(split) == "eval"):
        return False
    return in_half(domain, key, split)


def draw(domain: str, split: str, n: int, seed: int, make: Maker, permille: int) -> list[Record]:
    """``n`` records with distinct prompts from ``make``, kept only if they fall in ``split``.

    Rejection sampling keeps the split a property of the key alone; a bounded number of
    tries means a small universe returns fewer than ``n`` records instead of looping forever.
    dev and test are drawn from eval's stream (same seed), keeping only their half's keys;
    train_a and train_b likewise from train's.
    """
    rng = random.Random(f"{domain}/{stream_of(split)}/{seed}")
    out: list[Record] = []
    seen: set[str] = set()
    for _ in range(50 * n + 1000):
        if len(out) >= n:
            break
        key, rec = make(rng)
        if not in_split(domain, key, split, permille) or rec["prompt"] in seen:
            continue
        seen.add(rec["prompt"])
        out.append(rec)
    return out
