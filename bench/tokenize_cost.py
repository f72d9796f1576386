"""Tokenisation cost: first use vs the token cache (mixtune.data.token_cache), wall and CPU time.

    python bench/tokenize_cost.py                 # 100,000 short chat records, built-in tokenizer
    python bench/tokenize_cost.py --n 20000 --reps 3
    python bench/tokenize_cost.py --baseline-src /tmp/old/src   # + another checkout, same sitting

Times :func:`mixtune.data.tokenize.tokenize` with ``cache=True``, each case in its own process
so nothing is shared in memory: a cold start (nothing cached: render, tokenise, write the
entry), a warm start (the entry read back, as a resume or ``mixtune eval`` does), the cache off
(render and tokenise only) with the automatic worker count, and the cache off in one process
(``MIXTUNE_TOKENIZE_WORKERS=1``). ``--baseline-src`` adds the cache-off case run with the
``mixtune`` package found under that directory (e.g. ``git archive <commit> src | tar -x -C
/tmp/old``), for a before/after measured side by side. With ``--reps`` the cases alternate and
medians are printed. CPU time counts this process and its worker processes; on a shared
machine it is steadier than wall time. The part spent in the main process is printed too (with
workers, the rest is shared among them). Records: a user question and a short assistant
answer, like the built-in domains.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time


def one(n: int) -> dict:
    from mixtune.config import ModelConfig
    from mixtune.data import tokenize as tk
    from mixtune.data.formats import Example
    from mixtune.engine import build

    tok = build.load_tokenizer(ModelConfig())
    template = tk.resolve_template(tok, None, quiet=True)
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
    t0, c0 = time.perf_counter(), os.times()
    out = tk.tokenize(exs, tok, 512, template, "bench", cache=True)
    wall, c1 = time.perf_counter() - t0, os.times()
    own = sum(c1[:2]) - sum(c0[:2])  # user + system of this process
    children = sum(c1[2:4]) - sum(c0[2:4])  # ... and of its (reaped) worker processes
    workers = tk.pool_size(n) if hasattr(tk, "pool_size") else 1
    return {
        "seconds": wall,
        "cpu": own + children,
        "own": own,
        "examples": len(out),
        "workers": workers,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=1, help="alternate the cases this many times")
    p.add_argument("--baseline-src", help="a directory holding another checkout's mixtune")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.n)))
        return
    print(f"{a.n} records, {os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
    cache = tempfile.mkdtemp(prefix="mixtune-token-cache-")
    cases = [
        ("cold (cache empty)", {"MIXTUNE_CACHE_DIR": cache}, None),
        ("warm (from cache)", {"MIXTUNE_CACHE_DIR": cache}, None),
        ("cache off", {"MIXTUNE_CACHE_DIR": "off"}, None),
        (
            "cache off, 1 process",
            {"MIXTUNE_CACHE_DIR": "off", "MIXTUNE_TOKENIZE_WORKERS": "1"},
            None,
        ),
    ]
    if a.baseline_src:
        cases.append(("baseline, cache off", {"MIXTUNE_CACHE_DIR": "off"}, a.baseline_src))
    results: dict[str, list[dict]] = {label: [] for label, _, _ in cases}
    for rep in range(a.reps):
        for label, env, src in cases:
            if label.startswith("cold"):  # a fresh directory: nothing cached
                env["MIXTUNE_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="mixtune-token-cache-")
            if label.startswith("warm"):
                env["MIXTUNE_CACHE_DIR"] = cache
            child = {**os.environ, **env}
            if src:
                child["PYTHONPATH"] = os.path.abspath(src)
            out = subprocess.run(
                [sys.executable, __file__, "--one", f"--n={a.n}"],
                env=child,
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[label].append(r)
            print(
                f"[{rep + 1}] {label:22s} {r['seconds']:7.2f} s wall {r['cpu']:7.2f} s CPU "
                f"({r['own']:.2f} s in the main process)  {r['workers']} process(es), "
                f"{r['examples']} examples",
                flush=True,
            )
    print(f"medians over {a.reps} rep(s); load average now {os.getloadavg()}")
    med = {}
    for label, rs in results.items():
        med[label] = (
            statistics.median(r["seconds"] for r in rs),
            statistics.median(r["cpu"] for r in rs),
        )
        print(f"{label:22s} {med[label][0]:7.2f} s wall {med[label][1]:7.2f} s CPU")
    print(f"warm / cold: {med['warm (from cache)'][0] / med['cold (cache empty)'][0]:.3f}")
    if a.baseline_src:
        base, off = med["baseline, cache off"], med["cache off"]
        print(f"baseline / cache off: {base[0] / off[0]:.2f}x wall, {base[1] / off[1]:.2f}x CPU")


if __name__ == "__main__":
    main()
