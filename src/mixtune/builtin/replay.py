"""``replay``: general data of the benchmark base model's pre-training kind, as a regulariser.

Fine-tuning recipes protect what a model knows by mixing general text of its pre-training kind
back in (the DynaMiCS paper's Wikipedia / FineWeb regularisers). The benchmark base model
(``builtin-bench``) was pre-trained by ``scripts/pretrain_base.py --bench`` on the ``train_a``
half of definitions, arithmetic, safety and dialogue in :data:`REPLAY`'s token shares.
``replay`` draws records from the same domains in the same shares (as shares of records), each
tagged with its ``source``: its train split from their ``train_b`` halves -- fresh examples of
the kind the bench base learned, never seen by it -- and its eval / dev / test splits from
theirs. (For the demo's base model, trained on all of train, the train split is seen data.)
"""

from __future__ import annotations

import random

from mixtune.builtin.split import HALVES

REPLAY = {"definitions": 0.5, "arithmetic": 0.3, "safety": 0.12, "dialogue": 0.08}
DEFAULT_N = (4000, 400)  # (train, eval) records when n is None; dev and test get half of eval


def replay(split: str, n: int | None, seed: int, load_domain) -> list[dict]:
    """``n`` records of the pre-training mixture from ``split`` (fewer when a real source runs
    out), shuffled by ``seed``; ``load_domain(name, split, n, seed)`` reads each domain
    (:func:`mixtune.builtin.domains.load_domain`, passed in: that module dispatches here)."""
    if n is None:
        n = DEFAULT_N[split != "train"] // (2 if split in HALVES else 1)
    source = "train_b" if split == "train" else split  # fresh general data to train on
    out = []
    for name, share in REPLAY.items():
        k = round(share * n)
        out += [{**rec, "source": name} for rec in load_domain(name, source, k, seed)]
    random.Random(f"replay/{split}/{seed}").shuffle(out)
    return out
