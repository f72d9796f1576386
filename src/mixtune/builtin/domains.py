"""The built-in domain registry and its loader: ``DOMAINS`` and ``load_domain``.

Real domains read a shipped ``data/<name>.jsonl.gz`` (made by
``scripts/extract_builtin_data.py``); generated ones are drawn at call time from a seeded
``random.Random``. Either way a record's split depends only on its key (see
:mod:`mixtune.builtin.split`), so train and eval never overlap for any seed, and eval's halves
``dev`` and ``test`` never overlap each other.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from mixtune.builtin.generated import arithmetic, word_problems
from mixtune.builtin.replay import DEFAULT_N, replay
from mixtune.builtin.safety import safety
from mixtune.builtin.split import (
    HALVES,
    TRAIN_HALVES,
    Maker,
    Record,
    draw,
    in_eval,
    in_half,
    stream_of,
)

DATA = Path(__file__).parent / "data"
SPLITS = ("train", "eval", *HALVES, *TRAIN_HALVES)
EVAL_HALF_N = 400  # default size of a generated domain's dev and test halves


@dataclass(frozen=True)
class DomainInfo:
    """What a built-in domain is, where it comes from, and how to read its metrics."""

    name: str
    description: str
    kind: str  # "real" (shipped extract of a public source) | "generated" (seeded, at run time)
    #            | "mixture" (records of other built-in domains)
    license: str
    role: str  # suggested eval role: "target" | "constraint" | "monitor"
    metric: str  # the metric worth watching: "accuracy" (exact match) | "loss"
    eval_permille: int  # share of split keys held out for eval, in 1/1000
    default_n: tuple[int, int] = (0, 0)  # (train, eval) sizes when n is None; generated only


DOMAINS: dict[str, DomainInfo] = {
    d.name: d
    for d in (
        DomainInfo(
            "dialogue",
            "Small-talk pairs from chatterbot-corpus (English)",
            "real",
            "BSD-3-Clause (chatterbot-corpus)",
            "monitor",
            "loss",
            150,
        ),
        DomainInfo(
            "trivia",
            "General-knowledge questions with short answers (chatterbot-corpus); "
            "eval re-asks known facts in held-out phrasings",
            "real",
            "BSD-3-Clause (chatterbot-corpus)",
            "constraint",
            "accuracy",
            400,
        ),
        DomainInfo(
            "definitions",
            "Define a common English word (WordNet 3.0 first-sense gloss)",
            "real",
            "WordNet 3.0 licence (Princeton)",
            "monitor",
            "loss",
            50,
        ),
        DomainInfo(
            "code",
            "Write a Python function from its signature and summary (stdlib)",
            "real",
            "PSF-2.0 (CPython standard library)",
            "target",
            "loss",
            100,
        ),
        DomainInfo(
            "arithmetic",
            "What is a + b / a - b (below 100) or a * b (up to 12)?",
            "generated",
            "Apache-2.0 (mixtune)",
            "target",
            "accuracy",
            100,
            (5000, 200),
        ),
        DomainInfo(
            "word_problems",
            "Two- or three-step story problems with a numeric answer",
            "generated",
            "Apache-2.0 (mixtune)",
            "target",
            "accuracy",
            100,
            (2000, 200),
        ),
        DomainInfo(
            "safety",
            "Refuse harmful requests, help with benign look-alikes (flag 'harmful')",
            "generated",
            "Apache-2.0 (mixtune)",
            "constraint",
            "accuracy",
            200,
            (2000, 200),
        ),
        DomainInfo(
            "replay",
            "The base model's pre-training mixture (dialogue, trivia, "
            "definitions, arithmetic, safety): a regulariser (builtin/replay.py)",
            "mixture",
            "as its sources",
            "monitor",
            "loss",
            0,
            DEFAULT_N,
        ),
    )
}

MAKERS: dict[str, Maker] = {
    "arithmetic": arithmetic,
    "word_problems": word_problems,
    "safety": safety,
}

# trivia's eval asks the training facts again behind openers never used in training: a model
# this small cannot answer unseen trivia, but it can be tested on keeping what it knew
TRIVIA_TRAIN_OPENERS = (
    "Trivia question: ",
    "Quiz: ",
    "Here is one for you. ",
    "Can you answer this? ",
    "Question: ",
)
TRIVIA_EVAL_OPENERS = ("Do you know this? ", "Trivia time! ", "Test your knowledge: ")


def load_domain(
    name: str, split: str = "train", n: int | None = None, seed: int = 0
) -> list[Record]:
    """Records ``{"prompt", "response", "answer", ...}`` of one built-in domain.

    Args:
        name: a key of :data:`DOMAINS`.
        split: ``"train"`` or ``"eval"``; they never share a prompt. ``"dev"`` and
            ``"test"`` are the two halves of ``"eval"`` (disjoint, by a second hash of the
            split key; a real domain's dev and test records together are exactly its eval
            records, for any seed).
        n: how many records; ``None`` means all of a real domain, or the domain's
            ``default_n`` for a generated one (``EVAL_HALF_N`` for dev and test). A real
            domain returns at most what it has.
        seed: decides which records are drawn and their order (same seed, same list).
    """
    info = DOMAINS.get(name)
    if info is None:
        raise ValueError(f"unknown built-in domain {name!r}; valid names: {sorted(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if info.kind == "mixture":
        return replay(split, n, seed, load_domain)
    stream = stream_of(split)
    if info.kind == "generated":
        # dev and test: EVAL_HALF_N each (more than eval's default: a benchmark's constraints
        # need small standard errors, and generated domains cost nothing to draw)
        size = (
            EVAL_HALF_N
            if split in HALVES
            else info.default_n[stream == "eval"] // (1 if split == stream else 2)
        )
        return draw(name, split, size if n is None else n, seed, MAKERS[name], info.eval_permille)
    # a half (dev/test of eval, train_a/train_b of train) is its whole split drawn and
    # shuffled as usual, then halved: the same records, openers and order, so the two halves
    # together are exactly the whole
    rng = random.Random(f"{name}/{stream}/{seed}")
    pairs = _trivia(stream, rng) if name == "trivia" else _real(info, stream)
    rng.shuffle(pairs)
    records = [rec for key, rec in pairs if in_half(name, key, split)]
    return records if n is None else records[:n]


def write_domain_jsonl(
    name: str, path: str | Path, split: str = "train", n: int | None = None, seed: int = 0
) -> Path:
    """Write ``load_domain(name, split, n, seed)`` to ``path`` as JSON Lines; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps(rec, ensure_ascii=False) + "\n" for rec in load_domain(name, split, n, seed)
        )
    return path


@cache
def _read(name: str) -> tuple[dict, ...]:
    """The shipped extract, read once per process (the tuple keeps the cache immutable)."""
    with gzip.open(DATA / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


def _record(src: dict, prompt: str | None = None) -> Record:
    return {
        "prompt": prompt or src["prompt"],
        "response": src["response"],
        "answer": src["response"],
        "source": src["source"],
    }


def _real(info: DomainInfo, split: str) -> list[tuple[str, Record]]:
    """(split key, record) of every record in ``split`` (train or eval)."""
    want_eval = split == "eval"
    return [
        (r["key"], _record(r))
        for r in _read(info.name)
        if in_eval(info.name, r["key"], info.eval_permille) == want_eval
    ]


def _trivia(split: str, rng: random.Random) -> list[tuple[str, Record]]:
    """Train: every fact as written and once more behind a training opener.

    Eval: the held-out share of facts behind an eval-only opener, so no eval prompt is ever a
    training prompt, while the fact itself was taught.
    """
    permille = DOMAINS["trivia"].eval_permille
    out = []
    for r in _read("trivia"):
        if split == "train":
            out.append((r["key"], _record(r)))
            out.append((r["key"], _record(r, rng.choice(TRIVIA_TRAIN_OPENERS) + r["prompt"])))
        elif in_eval("trivia", r["key"], permille):
            out.append((r["key"], _record(r, rng.choice(TRIVIA_EVAL_OPENERS) + r["prompt"])))
    return out
