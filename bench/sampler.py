"""Draws/s of ``MixtureSampler.next_batch`` for many datasets and realistic batch sizes.

    python bench/sampler.py            # K = 2, 16, 128, 1024; n = 64, 1024; 7 repetitions
    python bench/sampler.py --quick    # 3 repetitions of shorter timings

Every dataset has ``--size`` examples (1000). Weights are uniform or a random Dirichlet(1)
point (seed 0). A repetition times a block of consecutive ``next_batch(n)`` calls lasting about
``--seconds`` (each sampler keeps its state across blocks, so passes wrap and reshuffle as in
training); draws/s = calls x n / elapsed. Repetitions are interleaved over the configurations
(rep 1 of every configuration, then rep 2, ...), so load changes on a shared machine hit all
alike. Reported: median wall-clock draws/s over repetitions, the minimum, the median on
CPU time (``process_time``: insensitive to being descheduled), and each K relative to K=2 at
the same n and weights (median of per-repetition wall ratios, and the CPU-time ratio).
Single process, numpy only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, median, table  # noqa: E402

from mixtune.data.sampler import MixtureSampler  # noqa: E402


def weights_for(kind: str, k: int) -> np.ndarray:
    if kind == "uniform":
        return np.full(k, 1 / k)
    return np.random.default_rng(0).dirichlet(np.ones(k))


def load_baseline(ref: str):
    """``MixtureSampler`` of ``src/mixtune/data/sampler.py`` at git revision ``ref``."""
    import subprocess
    import types

    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(
        ["git", "show", f"{ref}:src/mixtune/data/sampler.py"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    mod = types.ModuleType(f"sampler_{ref}")
    exec(compile(src, f"{ref}:sampler.py", "exec"), mod.__dict__)
    return mod.MixtureSampler


def check_same_stream(new_cls, old_cls, k: int, n: int, kind: str, size: int) -> None:
    """Both implementations draw identical batches and hold identical state (300 calls)."""
    args = ([size] * k, [f"d{i}" for i in range(k)], weights_for(kind, k))
    a, b = new_cls(*args, seed=3), old_cls(*args, seed=3)
    for _ in range(300):
        (d1, e1), (d2, e2) = a.next_batch(n), b.next_batch(n)
        assert (d1 == d2).all() and (e1 == e2).all(), f"streams differ (K={k}, n={n}, {kind})"
    assert a.state_dict() == b.state_dict(), f"states differ (K={k}, n={n}, {kind})"


def make(cls, k: int, n: int, kind: str, size: int, seconds: float):
    """A warmed-up sampler and the number of calls that take about ``seconds``."""
    s = cls([size] * k, [f"d{i}" for i in range(k)], weights_for(kind, k), seed=0)
    for _ in range(20):
        s.next_batch(n)
    t0 = time.perf_counter()
    for _ in range(5):
        s.next_batch(n)
    return s, max(5, int(seconds * 5 / max(time.perf_counter() - t0, 1e-7)))


def time_block(s, n: int, calls: int) -> tuple[float, float]:
    """(wall, CPU) draws/s over ``calls`` consecutive ``next_batch(n)`` calls."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
        s.next_batch(n)
    w1, c1 = time.perf_counter(), time.process_time()
    return calls * n / (w1 - w0), calls * n / max(c1 - c0, 1e-9)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repetitions of ~0.1 s")
    ap.add_argument("--ks", default="2,16,128,1024")
    ap.add_argument("--ns", default="64,1024")
    ap.add_argument("--weights", default="uniform,dirichlet")
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.5, help="per repetition")
    ap.add_argument(
        "--baseline",
        metavar="GIT_REF",
        help="also time the sampler at this git revision (interleaved), after "
        "checking that it draws the same stream",
    )
    ap.add_argument("--json", help="write all measurements here")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.seconds = 3, 0.1
    ks = [int(x) for x in a.ks.split(",")]
    ns = [int(x) for x in a.ns.split(",")]
    print(f"load before: {loadavg()}", flush=True)
    configs = [(kind, n, k) for kind in a.weights.split(",") for n in ns for k in ks]
    impls = {"current": MixtureSampler}
    if a.baseline:
        impls["baseline"] = load_baseline(a.baseline)
        for kind, n, k in configs:
            check_same_stream(MixtureSampler, impls["baseline"], k, n, kind, a.size)
        print(f"exactness: same batches and state as {a.baseline} for every configuration")
    samplers = {
        (i, c): make(cls, c[2], c[1], c[0], a.size, a.seconds)
        for c in configs
        for i, cls in impls.items()
    }
    wall: dict = {key: [] for key in samplers}
    cpu: dict = {key: [] for key in samplers}
    for _ in range(a.reps):  # interleaved, so that load changes hit every configuration alike
        for key, (s, calls) in samplers.items():
            w, p = time_block(s, key[1][1], calls)
            wall[key].append(w)
            cpu[key].append(p)
    print(f"load after: {loadavg()}")
    for impl in impls:
        rows = []
        for kind, n, k in configs:
            c, base = (impl, (kind, n, k)), (impl, (kind, n, ks[0]))
            paired = median(x / y for x, y in zip(wall[c], wall[base]))
            row = [
                kind,
                n,
                k,
                median(wall[c]),
                min(wall[c]),
                median(cpu[c]),
                paired,
                median(cpu[c]) / median(cpu[base]),
                "yes" if median(wall[c]) >= 1e6 else "NO",
            ]
            if impl == "current" and a.baseline:
                b = ("baseline", (kind, n, k))
                row.append(median(x / y for x, y in zip(wall[c], wall[b])))
            rows.append(row)
        print(f"\n{impl} sampler" + (f" ({a.baseline})" if impl == "baseline" else ""))
        print(
            table(
                [
                    "weights",
                    "n per call",
                    "K",
                    "median draws/s",
                    "min draws/s",
                    "CPU draws/s",
                    f"vs K={ks[0]} (wall, paired)",
                    f"vs K={ks[0]} (CPU)",
                    ">= 1M/s",
                ]
                + (["vs baseline (paired)"] if len(rows[0]) > 9 else []),
                rows,
            )
        )
    res = {
        f"{i}/{'/'.join(map(str, c))}": {"wall": wall[i, c], "cpu": cpu[i, c]} for i, c in samplers
    }
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "draws_per_s": res}, indent=1))


if __name__ == "__main__":
    main()
