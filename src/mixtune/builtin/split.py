"""Train/eval splits that never overlap, whatever the seed.

A record's split is a pure function of its domain and its *key* (a hash), never of the seed or
of the order it was drawn in. The key groups records that must stay together: the operands of a
sum (so "What is 3 + 4?" and "Compute 3 + 4." share a split), a word and its definition, or a
normalised prompt. The seed only decides which records are drawn and their order.
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


def draw(domain: str, split: str, n: int, seed: int, make: Maker, permille: int) -> list[Record]:
    """``n`` records with distinct prompts from ``make``, kept only if they fall in ``split``.

    Rejection sampling keeps the split a property of the key alone; a bounded number of
    tries means a small universe returns fewer than ``n`` records instead of looping forever.
    """
    rng = random.Random(f"{domain}/{split}/{seed}")
    want_eval = split == "eval"
    out: list[Record] = []
    seen: set[str] = set()
    for _ in range(50 * n + 1000):
        if len(out) >= n:
            break
        key, rec = make(rng)
        if in_eval(domain, key, permille) != want_eval or rec["prompt"] in seen:
            continue
        seen.add(rec["prompt"])
        out.append(rec)
    return out
