"""``replay``: the built-in base model's pre-training mixture, as a regulariser dataset.

Fine-tuning recipes protect what a model knows by mixing some of its general pre-training text
back in (the DynaMiCS paper's Wikipedia / FineWeb regularisers). For the built-in base model that
text is known exactly: ``scripts/pretrain_base.py`` trained it on dialogue, trivia, definitions,
arithmetic and safety. ``replay`` draws records from those domains in :data:`REPLAY`'s shares
(the pre-training mixture's token shares, used here as shares of records), each record tagged
with its ``source``. Its train split is drawn from the sources' train splits, so it repeats what
the base saw; its eval / dev / test splits from theirs, which the base never saw.
"""

from __future__ import annotations

import random

REPLAY = {"definitions": 0.32, "dialogue": 0.12, "trivia": 0.2, "arithmetic": 0.28,
          "safety": 0.08}
DEFAULT_N = (4000, 400)  # (train, eval) records when n is None; dev and test get half of eval


def replay(split: str, n: int | None, seed: int) -> list[dict]:
    """``n`` records of the pre-training mixture from ``split`` (fewer when a real source runs
    out), shuffled by ``seed``."""
    from mixtune.builtin.domains import load_domain
    from mixtune.builtin.split import HALVES

    if n is None:
        n = DEFAULT_N[split != "train"] // (2 if split in HALVES else 1)
    out = []
    for name, share in REPLAY.items():
        k = round(share * n)
        out += [{**rec, "source": name} for rec in load_domain(name, split, k, seed)]
    random.Random(f"replay/{split}/{seed}").shuffle(out)
    return out
