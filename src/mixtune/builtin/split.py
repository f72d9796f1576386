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


def in_split(domain: str, key: str, split: str, permille: int) -> bool:
    """Whether ``key`` belongs to ``split`` (train, eval, or its halves dev and test)."""
    if not in_eval(domain, key, permille):
        return split == "train"
    return split == "eval" or (split in HALVES and in_test(domain, key) == (split == "test"))


def draw(domain: str, split: str, n: int, seed: int, make: Maker, permille: int) -> list[Record]:
    """``n`` records with distinct prompts from ``make``, kept only if they fall in ``split``.

    Rejection sampling keeps the split a property of the key alone; a bounded number of
    tries means a small universe returns fewer than ``n`` records instead of looping forever.
    dev and test are drawn from eval's stream (same seed), keeping only their half's keys.
    """
    stream = "eval" if split in HALVES else split
    rng = random.Random(f"{domain}/{stream}/{seed}")
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
