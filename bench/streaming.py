"""Memory of streaming vs in-memory training datasets as the dataset grows.

For each size, a fresh process builds a run over one dataset of short addition lines (a
directory of 100k-line JSONL shards, generated under /tmp) and trains a few steps of a tiny
llama; it reports resident memory (VmRSS) after imports, after building the run, after training,
and the peak (VmHWM), plus build and training time. Streaming reads with a 1024-example shuffle
buffer; in-memory reads, tokenises and holds everything (skipped above --max-in-memory).

    python bench/streaming.py            # 10k, 100k, 1M streamed; 10k, 100k in memory
    python bench/streaming.py --quick    # 2k, 20k
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
from pathlib import Path

SHARD = 100_000
TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}


def make_data(root: Path, n: int) -> Path:
    d = root / f"add-{n}"
    if (d / "done").is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(n)
    for s in range(0, n, SHARD):
        with open(d / f"part-{s // SHARD:04d}.jsonl", "w") as f:
            for _ in range(min(SHARD, n - s)):
                a, b = rng.randint(0, 999), rng.randint(0, 999)
                f.write(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)}) + "\n")
    (d / "done").write_text("ok")
    return d


def rss_mb() -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def one(mode: str, data: str, steps: int, out: str) -> None:
    """Run in a child process: build, train, print one JSON line of measurements."""
    import torch

    torch.set_num_threads(1)
    import accelerate  # noqa: F401  (libraries both paths load: outside the measured growth)
    import datasets  # noqa: F401
    import transformers  # noqa: F401

    from mixtune import config
    from mixtune.engine.loop import Trainer

    base = rss_mb()[0]
    ds = {"name": "add", "path": data}
    if mode == "streaming":
        ds.update(streaming=True, shuffle_buffer=1024)
    cfg = config.load(
        data={
            "output_dir": out,
            "max_steps": steps,
            "progress": False,
            "seed": 0,
            "model": {"tokenizer": "byte", "config": TINY},
            "datasets": [ds],
            "evals": [],
            "mixer": {"name": "uniform"},
            "train": {"batch_size": 16, "max_length": 64, "eval_every": 0, "log_every": steps},
        }
    )
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    built, t1 = rss_mb()[0], time.perf_counter()
    trainer.run()
    trained, peak = rss_mb()
    print(
        json.dumps(
            {
                "built_mb": built - base,
                "trained_mb": trained - base,
                "peak_mb": peak - base,
                "base_mb": base,
                "build_s": t1 - t0,
                "train_s": time.perf_counter() - t1,
                "size": trainer.train_sets[0].size,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--max-in-memory", type=int, default=100_000)
    ap.add_argument("--root", default="/tmp/mixtune-streaming-bench")
    ap.add_argument("--out", default="bench/results/streaming.json")
    ap.add_argument("--one", nargs=3, metavar=("MODE", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args.one[0], args.one[1], args.steps, args.one[2])
    sizes = [2_000, 20_000] if args.quick else [10_000, 100_000, 1_000_000]
    rows = []
    for n in sizes:
        data = make_data(Path(args.root), n)
        for mode in ("streaming", "in-memory"):
            if mode == "in-memory" and n > args.max_in_memory:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                env = dict(os.environ, OMP_NUM_THREADS="1")
                res = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--steps",
                        str(args.steps),
                        "--one",
                        mode,
                        str(data),
                        tmp,
                    ],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                )
            row = {"examples": n, "mode": mode, **json.loads(res.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(
                f"{n:>9,} {mode:<10} build {row['built_mb']:7.1f} MB  after training "
                f"{row['trained_mb']:7.1f} MB  peak {row['peak_mb']:7.1f} MB  "
                f"build {row['build_s']:6.2f}s  train {row['train_s']:5.2f}s",
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
