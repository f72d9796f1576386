"""Tokenisation cost: first use vs the token cache (mixtune.data.token_cache).

    python bench/tokenize_cost.py                 # 100,000 short chat records, built-in tokenizer
    python bench/tokenize_cost.py --n 20000

Times :func:`mixtune.data.tokenize.tokenize` with ``cache=True`` three ways, each in its own
process so nothing is shared in memory: a cold start (nothing cached: render, tokenise, write
the entry), a warm start (the entry read back, as a resume or ``mixtune eval`` does) and the
cache off (render and tokenise only). Records: a user question and a short assistant answer,
like the built-in domains.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time


def one(n: int) -> dict:
    from mixtune.config import ModelConfig
    from mixtune.data.formats import Example
    from mixtune.data.tokenize import resolve_template, tokenize
    from mixtune.engine import build

    tok = build.load_tokenizer(ModelConfig())
    template = resolve_template(tok, None, quiet=True)
    rng = random.Random(0)
    exs = [
        Example(
            [
                {
                    "role": "user",
                    "content": f"What is {rng.randint(0, 999)} plus {rng.randint(0, 999)}?",
                },
                {"role": "assistant", "content": f"The answer is {rng.randint(0, 2000)}."},
            ],
            None,
            None,
        )
        for _ in range(n)
    ]
    t0 = time.perf_counter()
    out = tokenize(exs, tok, 512, template, "bench", cache=True)
    return {"seconds": time.perf_counter() - t0, "examples": len(out)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.n)))
        return
    cache = tempfile.mkdtemp(prefix="mixtune-token-cache-")
    rows = []
    for label, env in (
        ("cold (cache empty)", cache),
        ("warm (from cache)", cache),
        ("cache off", "off"),
    ):
        out = subprocess.run(
            [sys.executable, __file__, "--one", f"--n={a.n}"],
            env={**os.environ, "MIXTUNE_CACHE_DIR": env},
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((label, r["seconds"]))
        print(f"{label:20s} {r['seconds']:8.2f} s  ({r['examples']} examples)", flush=True)
    print(f"warm / cold: {rows[1][1] / rows[0][1]:.3f}")


if __name__ == "__main__":
    main()
