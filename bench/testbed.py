"""Is the benchmark testbed one where mixing methods can show anything?

Measures, on the built-in base model, what a constrained-mixing benchmark needs:

1. **Headroom**: each candidate constraint domain's base loss on held-out examples (the ``dev``
   split, never trained on by the base) with its standard error over examples, next to the
   base's loss on its own pre-training (``train``) examples. A domain whose held-out loss is
   near zero is memorised: any update breaks a strict reference and nothing can be feasible.
2. **Gradual erosion, and protection**: fixed mixtures trained for ``--steps`` steps —
   target-only, the regulariser alone (``replay``: the base's pre-training mixture), and
   target/replay blends — with every domain evaluated every ``--eval-every`` steps. For each
   constraint: its change since step 0 and the paired standard error of that change
   (``change_se``, same examples before and after), so "moved by more than its noise" can be
   read off directly.

Run (about 10 minutes on 2 idle cores)::

    python bench/testbed.py --out bench/results/testbed.json --work /tmp/testbed

Writes the JSON (every run's evaluation trajectory) and prints the tables that
bench/results/testbed.md quotes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import loadavg, pin_threads  # noqa: E402

MODEL = "builtin-bench"
SEEN = {"builtin-bench": "train_a", "builtin": "train"}  # what each base pre-trained on
CANDIDATES = ("definitions", "arithmetic", "dialogue", "safety", "trivia")


def evals(domains, split: str, batches: int) -> list[dict]:
    return [
        {
            "name": d,
            "path": f"builtin:{d}",
            "split": split,
            "batches": batches,
            "batch_size": 8,
            "accuracy": False,
            "role": "monitor",
        }
        for d in domains
    ]


def run(
    work: Path,
    name: str,
    datasets: list[dict],
    weights: dict,
    steps: int,
    eval_every: int,
    batches: int,
    lr: float,
    seed: int,
) -> list[dict]:
    from mixtune import config
    from mixtune.engine.loop import Trainer
    from mixtune.engine.rundir import read_metrics

    out = work / name
    raw = {
        "output_dir": str(out),
        "seed": seed,
        "max_steps": steps,
        "progress": False,
        "resume": "never",
        "model": {"name_or_path": MODEL},
        "datasets": datasets,
        "evals": evals(sorted({*CANDIDATES, "code", "word_problems"}), "dev", batches),
        "mixer": {"name": "fixed", "weights": weights},
        "train": {
            "batch_size": 8,
            "lr": lr,
            "schedule": "constant",
            "max_length": 128,
            "eval_every": eval_every,
            "log_every": eval_every,
            "save_every": 0,
        },
    }
    if out.exists():
        import shutil

        shutil.rmtree(out)
    Trainer(config.load(data=raw)).run()
    return [{"step": r["step"], "eval": r["eval"]} for r in read_metrics(out) if "eval" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/testbed.json")
    ap.add_argument("--work", default="/tmp/testbed")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=32)
    ap.add_argument("--batches", type=int, default=64, help="eval batches of 8 (capped by data)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--targets", default="code,word_problems")
    ap.add_argument("--model", default="builtin-bench", help="builtin-bench, builtin, or a path")
    args = ap.parse_args()
    global MODEL
    MODEL = args.model
    pin_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {"args": vars(args), "loadavg_start": loadavg(), "runs": {}}

    # 1. headroom: base on held-out dev vs its own pre-training examples
    from mixtune import config
    from mixtune.engine.loop import Trainer

    raw = {
        "output_dir": str(work / "_base"),
        "seed": args.seed,
        "max_steps": 1,
        "progress": False,
        "model": {"name_or_path": MODEL},
        "datasets": [{"name": "x", "path": "builtin:code"}],
        "evals": (
            evals(CANDIDATES, "dev", args.batches)
            + [
                {**e, "name": e["name"] + "_train"}
                for e in evals(CANDIDATES, SEEN[MODEL], args.batches)
            ]
        ),
        "train": {"max_length": 128},
    }
    base = Trainer(config.load(data=raw)).evaluate(accuracy=False, use_cache=False)
    result["base"] = base
    print("\n## Base model: held-out (dev) vs pre-training (train) examples\n")
    print(f"model: {MODEL}\n")
    print("| domain | dev loss ± se (n) | train loss | held-out / train |")
    print("|---|---|---|---|")
    for d in CANDIDATES:
        dv, tr = base[d], base[d + "_train"]
        print(
            f"| {d} | {dv['loss']:.3f} ± {dv['loss_se']:.3f} ({dv['n']}) | {tr['loss']:.3f} "
            f"| {dv['loss'] / max(tr['loss'], 1e-9):.1f}x |"
        )

    # 2. erosion and protection
    for target in args.targets.split(","):
        datasets = [
            {"name": target, "path": f"builtin:{target}"},
            {"name": "replay", "path": "builtin:replay"},
        ]
        for label, w in (
            ("target-only", {target: 1.0}),
            ("t0.8", {target: 0.8, "replay": 0.2}),
            ("t0.5", {target: 0.5, "replay": 0.5}),
            ("replay-only", {"replay": 1.0}),
        ):
            if label == "replay-only" and target != args.targets.split(",")[0]:
                continue  # the same run for every target
            name = f"{target}-{label}" if label != "replay-only" else "replay-only"
            t1 = time.perf_counter()
            result["runs"][name] = run(
                work,
                name,
                datasets,
                w,
                args.steps,
                args.eval_every,
                args.batches,
                args.lr,
                args.seed,
            )
            print(f"{name}: {time.perf_counter() - t1:.0f} s", flush=True)

    print("\n## Change since step 0 at the end (± paired se), per run\n")
    doms = [*CANDIDATES, *args.targets.split(",")]
    print("| run | " + " | ".join(doms) + " |")
    print("|---|" + "---|" * len(doms))
    for name, traj in result["runs"].items():
        first, last = traj[0]["eval"], traj[-1]["eval"]
        cells = [
            f"{last[d]['loss'] - first[d]['loss']:+.3f} ± {last[d].get('change_se', 0):.3f}"
            for d in doms
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["loadavg_end"] = loadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{result['seconds']} s; load {result['loadavg_start']} -> {result['loadavg_end']}")


if __name__ == "__main__":
    main()
