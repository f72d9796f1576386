"""DynamixSFT vs the static and EXP3 baselines: held-out quality at the same budget, and overhead.

    python bench/dynamixsft.py                  # 3 seeds x 6 methods, 400 steps each
    python bench/dynamixsft.py --quick          # smoke: 1 seed, 40 steps, T_update 10
    python bench/dynamixsft.py --seeds 5 --steps 600 --threads 1 --json out.json

Every run fine-tunes the tiny built-in base model (``model.name_or_path: builtin``; a randomly
initialised model of the same shape with ``--random-init``, or automatically when the base model
is not built yet) on five built-in domains (arithmetic, word_problems, code, dialogue, safety)
with the same number of steps and examples per step (the same example budget; supervised tokens
seen are reported, they differ with the mixture). Quality is measured once at the end on each
domain's held-out ``eval`` split: the mean of the per-domain losses, and the mean accuracy
(greedy exact match) over the domains that have one (arithmetic, word_problems, safety).

Timing: each run is a fresh process pinned to ``--threads`` threads; methods alternate
A B C D ... per seed, so a ratio is measured side by side. ``train s`` is the wall time of the
training loop without evaluation, checkpoint writing and the final save (timed in the worker);
``mixer s`` is the time spent in the mixer's updates (look-aheads included). Two overheads:
the end-to-end ratio, median over seeds of (train s / proportional's train s, same seed) --
which also moves with the mixture, since datasets differ in sequence length -- and the mixer's
own share, median of mixer s / (train s - mixer s), i.e. relative to this run's own steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, median, pin_threads, run_worker, table  # noqa: E402

DOMAINS = ("arithmetic", "word_problems", "code", "dialogue", "safety")
ACCURACY = ("arithmetic", "word_problems", "safety")
METHODS = {
    "proportional": {"name": "proportional"},
    "uniform": {"name": "uniform"},
    "exp3": {"name": "exp3"},
    "dynamixsft": {"name": "dynamixsft"},  # the paper's defaults: sgd virtual step, T=50
    "dynamixsft-adam": {"name": "dynamixsft", "optimizer": "adam"},
    "dynamixsft-progress": {"name": "dynamixsft", "reward": "progress"},
}
BASE_SHAPE = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def run_config(
    method: str,
    seed: int,
    steps: int,
    update_every: int,
    out: Path,
    random_init: bool,
    packing: bool = False,
) -> dict:
    mixer = dict(METHODS[method])
    if mixer["name"] == "dynamixsft":
        mixer["update_every"] = update_every
    model = (
        {"name_or_path": "builtin", "tokenizer": "builtin", "config": BASE_SHAPE}
        if random_init
        else {"name_or_path": "builtin"}
    )
    return {
        "output_dir": str(out / f"{method}-s{seed}"),
        "seed": seed,
        "max_steps": steps,
        "resume": "never",
        "progress": False,
        "model": model,
        "datasets": [{"name": d, "path": f"builtin:{d}"} for d in DOMAINS],
        "evals": [
            {
                "name": d,
                "path": f"builtin:{d}",
                "split": "eval",
                "batches": 4,
                "batch_size": 16,
                "max_new_tokens": 16,
                "accuracy": d in ACCURACY,
            }
            for d in DOMAINS
        ],
        "mixer": mixer,
        "train": {
            "batch_size": 16,
            "lr": 5e-4,
            "schedule": "cosine",
            "warmup_ratio": 0.03,
            "max_length": 256,
            "eval_every": 0,
            "log_every": 10,
            "save_every": 0,
            "packing": packing,
        },
    }


# ---------------------------------------------------------------------------------------------
def worker(cfg_path: str, threads: int) -> None:
    """One run; prints a JSON line with final metrics and the split of the wall time."""
    pin_threads(threads)
    from mixtune import config
    from mixtune.engine import evaluation, loop

    spent = {"eval": 0.0, "mixer": 0.0, "save": 0.0}

    def timed(key, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t0

        return wrapper

    # Scheduled evaluations go through evaluate_examples (look-aheads do not: mixer time).
    evaluation.evaluate_examples = timed("eval", evaluation.evaluate_examples)
    loop.Trainer._update_mixer = timed("mixer", loop.Trainer._update_mixer)
    loop.Trainer._save = timed("save", loop.Trainer._save)
    loop.Trainer._finish = timed("save", loop.Trainer._finish)
    trainer = loop.Trainer(config.load(data=json.loads(Path(cfg_path).read_text())))
    t0 = time.perf_counter()
    summary = trainer.run()
    wall = time.perf_counter() - t0
    final = summary["final_eval"]
    print(
        json.dumps(
            {
                "wall": wall,
                "train": wall - spent["eval"] - spent["save"],
                "mixer": spent["mixer"],
                "eval": spent["eval"],
                "tokens": summary["tokens"],
                "weights": summary["weights"],
                "loss": {d: final[d]["loss"] for d in DOMAINS},
                "accuracy": {d: final[d]["accuracy"] for d in ACCURACY if "accuracy" in final[d]},
            }
        )
    )


# ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 40 steps, T_update 10")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--update-every", type=int, default=50, help="DynamixSFT's T_update")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--packing", action="store_true", help="train.packing=true in every run")
    ap.add_argument("--json", help="also write every run's record here")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]))
    if args.quick:
        args.seeds, args.steps, args.update_every = 1, 40, 10
    from mixtune.builtin import base_model_path

    random_init = args.random_init or not (base_model_path() / "config.json").is_file()
    methods = args.methods.split(",")
    assert "proportional" in methods, "the overhead is measured against proportional"
    tmp = Path(tempfile.mkdtemp(prefix="bench-dynamixsft-"))
    runs: list[dict] = []
    started = time.time()
    for seed in range(args.seeds):
        for m in methods:  # alternate methods within a seed: ratios are side by side
            cfg = run_config(m, seed, args.steps, args.update_every, tmp, random_init, args.packing)
            path = tmp / f"{m}-s{seed}.json"
            path.write_text(json.dumps(cfg))
            res = run_worker(
                [__file__, "--worker", str(path), str(args.threads)],
                args.threads,
                tmp / "workers.log",
            )
            res.update(method=m, seed=seed)
            runs.append(res)
            print(
                f"seed {seed} {m:>20}: loss {np.mean(list(res['loss'].values())):.4f} "
                f"acc {np.mean(list(res['accuracy'].values())):.4f} train {res['train']:.1f}s "
                f"mixer {res['mixer']:.1f}s",
                flush=True,
            )
    report = render(args, runs, methods, random_init, time.time() - started)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


def render(args, runs, methods, random_init, seconds) -> str:
    by = {m: [r for r in runs if r["method"] == m] for m in methods}
    prop = {r["seed"]: r["train"] for r in by["proportional"]}
    rows = []
    for m in methods:
        rs = by[m]
        loss = [np.mean(list(r["loss"].values())) for r in rs]
        acc = [np.mean(list(r["accuracy"].values())) for r in rs]
        ratio = [r["train"] / prop[r["seed"]] for r in rs]
        share = [r["mixer"] / (r["train"] - r["mixer"]) for r in rs]
        rows.append(
            [
                m,
                f"{np.mean(loss):.4f} ± {np.std(loss):.4f}",
                f"{np.mean(acc):.4f} ± {np.std(acc):.4f}",
                median([r["tokens"] for r in rs]),
                median([r["train"] for r in rs]),
                median([r["mixer"] for r in rs]),
                f"{median(ratio):.3f}x",
                f"+{100 * median(share):.1f}%",
            ]
        )
    per_domain = [
        [m]
        + [f"{np.mean([r['loss'][d] for r in by[m]]):.3f}" for d in DOMAINS]
        + [f"{np.mean([r['accuracy'].get(d, np.nan) for r in by[m]]):.3f}" for d in ACCURACY]
        for m in methods
    ]
    weights = [
        [m] + [f"{np.mean([r['weights'][d] for r in by[m]]):.3f}" for d in DOMAINS] for m in methods
    ]
    import torch

    return "\n".join(
        [
            f"machine: 2-core CPU, torch {torch.__version__}, python {platform.python_version()}; "
            f"{args.threads} thread(s) per run; load average at the end {loadavg()}",
            f"model: {'random-init tiny llama' if random_init else 'builtin base'}; "
            f"{args.seeds} seeds x {len(methods)} methods, {args.steps} steps x 16 examples, "
            f"DynamixSFT T_update={args.update_every}; total {seconds / 60:.1f} min",
            "",
            table(
                [
                    "method",
                    "mean held-out loss (± sd over seeds)",
                    "mean accuracy",
                    "tokens (median)",
                    "train s (median)",
                    "mixer s (median)",
                    "train s / proportional's (median ratio)",
                    "mixer s / rest of train s (median)",
                ],
                rows,
            ),
            "",
            "Per-domain held-out loss / accuracy (mean over seeds):",
            "",
            table(
                ["method"] + [f"{d} loss" for d in DOMAINS] + [f"{d} acc" for d in ACCURACY],
                per_domain,
            ),
            "",
            "Final weights (mean over seeds):",
            "",
            table(["method", *DOMAINS], weights),
        ]
    )


if __name__ == "__main__":
    main()
