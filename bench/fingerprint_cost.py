"""What the resume fingerprint costs at scale: hashing every tokenised example at each start,
against the rest of a start whose examples come from the token cache.

    python bench/fingerprint_cost.py                 # 1,000,000 short examples
    python bench/fingerprint_cost.py --n 100000

Writes ``n`` short prompt/response records (``What is a plus b?`` / the sum) to a JSONL file and
builds the run's data from it with the built-in model's tokenizer, as ``mixtune train`` does
(:func:`mixtune.data.domains.build`: read, normalise, select, key, token cache). Tokenising a
million chat records takes minutes, so the token cache entry is filled from token arrays made
directly: the first build runs with the tokeniser replaced by one that takes each record's
bytes as its tokens (prompt untrained, answer trained); the arrays have the types the tokeniser
produces, and the builds that are timed read them back from the cache exactly as a resume does.
Times, medians of 3, one process:

- ``cached data build``: :func:`mixtune.data.domains.build` on a warm token cache, and the
  part of it spent in :func:`mixtune.data.tokenize.tokenize` (tokenising from the cache: the
  entry's key from the examples' content, then the entry read);
- ``fingerprint``: :func:`mixtune.engine.fingerprint.of_run` on its result (settings, model
  content, and :func:`mixtune.engine.content.examples_digest` of the examples), and the
  per-example :func:`mixtune.data.tokenize.digest` that every start computed before (now only a
  resume of a run recorded with it, once).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np


def _median(fn, repeats: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _synthetic(examples, tokenizer, max_length, template, where):
    """Token arrays made directly: a record's bytes as its tokens (see the module docstring)."""
    from mixtune.data.tokenize import IGNORE, Tokenized

    out = Tokenized()
    for ex in examples:
        prompt = np.frombuffer(ex.messages[0]["content"].encode(), np.uint8).astype(np.int64)
        answer = np.frombuffer(ex.messages[-1]["content"].encode() + b"\n", np.uint8)
        answer = answer.astype(np.int64)
        out.input_ids.append(np.concatenate([prompt, answer]))
        out.labels.append(np.concatenate([np.full(len(prompt), IGNORE), answer]))
        out.prompt_len.append(len(prompt))
        out.answers.append(ex.answer)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fingerprint-cost-"))
    os.environ["MIXTUNE_CACHE_DIR"] = str(work / "cache")
    from mixtune import config
    from mixtune.data import domains
    from mixtune.data import tokenize as tokenize_mod
    from mixtune.engine import build, content, fingerprint

    rng = random.Random(0)
    with open(work / "add.jsonl", "w") as f:
        for _ in range(args.n):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            rec = {"prompt": f"What is {a} plus {b}?", "response": str(a + b)}
            f.write(json.dumps(rec) + "\n")
    cfg = config.load(
        data={
            "output_dir": str(work / "run"),
            "max_steps": 1,
            "datasets": [{"name": "add", "path": str(work / "add.jsonl")}],
            "evals": [],
        }
    )
    tok = build.load_tokenizer(cfg.model)
    with mock.patch.object(tokenize_mod, "_tokenize", _synthetic):
        domains.build(cfg, tok)  # fills the token cache

    spent: list[float] = []  # the cached tokenise calls inside each build

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return tokenize_mod.tokenize(*a, **kw)
        finally:
            spent.append(time.perf_counter() - t0)

    with mock.patch.object(domains, "tokenize", timed):
        cached, (train, evals) = _median(lambda: domains.build(cfg, tok))
    from_cache = statistics.median(spent)
    data = train[0].data
    assert len(data) == args.n
    tokens = sum(len(x) for x in data.input_ids)
    now, fp = _median(lambda: fingerprint.of_run(cfg, tok, train, evals))
    assert fp["datasets.add.digest"].startswith(content.V2)
    before, _ = _median(lambda: tokenize_mod.digest(data.input_ids, data.labels, data.answers))
    print(f"{args.n:,} examples, {tokens / args.n:.1f} tokens each; medians of 3")
    print("| | s | share of the cached data build | share of tokenising from the cache |")
    print("|---|---|---|---|")
    rows = [
        ("cached data build (read, normalise, select, token cache)", cached),
        ("of which tokenising from the cache (key + entry read)", from_cache),
        ("fingerprint before (per-example digest)", before),
        ("fingerprint now (`fingerprint.of_run`)", now),
    ]
    for name, t in rows:
        print(f"| {name} | {t:.2f} | {t / cached:.2f} | {t / from_cache:.2f} |")


if __name__ == "__main__":
    main()
