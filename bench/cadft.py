"""SFT vs DFT vs CADFT on built-in domains whose training targets are partly corrupted.

Scenarios (training data written to JSONL under --work; eval sets are the clean built-in ones):

- ``arithmetic-noisy``: builtin arithmetic; a share of the training responses (``--noise``) is
  replaced by a wrong number (the right answer plus a random non-zero offset). The base model
  saw some arithmetic in pretraining, so wrong answers are low-likelihood (incompatible).
- ``wordprob-foreign``: builtin word_problems (new to the base model) mixed with clean
  arithmetic; a share of the word-problem responses is replaced by an unrelated dialogue reply
  (incompatible in form, not just in value).

Measured per run: held-out exact-match accuracy of the target domain at the end, the
pre-clip gradient norm of every step (variance, and coefficient of variation, which is
comparable across losses of different scale), and for CADFT the mean weight given to corrupted
vs clean examples and how many rewrites hit corrupted examples.

    python bench/cadft.py              # full: 2 scenarios x 4 methods x 3 seeds
    python bench/cadft.py --quick      # smoke: 1 scenario, 1 seed, few steps
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mixtune import config
from mixtune.builtin import load_domain
from mixtune.engine.loop import Trainer
from mixtune.losses.cadft import CADFT

METHODS = {  # "sft-clean" trains SFT on the uncorrupted data: the reference for what noise costs
    "sft-clean": {"name": "sft"},
    "sft": {"name": "sft"},
    "dft": {"name": "dft"},
    "cadft": {"name": "cadft"},
    "cadft-norewrite": {"name": "cadft", "rewrite": {"enabled": False}},
}


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def corrupt_numbers(records, share, rng):
    out, bad = [], set()
    for r in records:
        r = dict(r)
        if rng.random() < share:
            r["response"] = str(int(r["response"]) + rng.choice([-1, 1]) * rng.randint(1, 20))
            bad.add(r["prompt"])
        out.append(r)
    return out, bad


def corrupt_foreign(records, share, rng, replies):
    out, bad = [], set()
    for r in records:
        r = dict(r)
        if rng.random() < share:
            r["response"] = rng.choice(replies)
            bad.add(r["prompt"])
        out.append(r)
    return out, bad


def scenario(name: str, work: Path, noise: float, n: int) -> tuple[dict, set]:
    """(config fragments, prompts whose target is corrupted)."""
    rng = random.Random(1234)
    if name == "arithmetic-noisy":
        target, clean = "arithmetic", load_domain("arithmetic", "train", n=n)
        recs, bad = corrupt_numbers(clean, noise, rng)
        extra = []
    else:
        replies = [r["response"] for r in load_domain("dialogue", "train")]
        target, clean = "word_problems", load_domain("word_problems", "train", n=n)
        recs, bad = corrupt_foreign(clean, noise, rng, replies)
        extra = [{"name": "arithmetic", "path": "builtin:arithmetic", "max_examples": n}]
    datasets = {
        kind: [{"name": target, "path": write_jsonl(work / f"{name}-{kind}.jsonl", r)}] + extra
        for kind, r in (("noisy", recs), ("clean", clean))
    }
    evals = [
        {
            "name": target,
            "path": f"builtin:{target}",
            "split": "eval",
            "role": "target",
            "batches": 8,
            "batch_size": 16,
            "max_new_tokens": 8,
        }
    ]
    return {"datasets": datasets, "evals": evals, "target": target}, bad


class WeightSpy:
    """Mean CADFT weight of corrupted vs clean examples (wraps CADFT.prepare)."""

    def __init__(self):
        self.flags: dict = {}
        self.sums = {True: [0.0, 0], False: [0.0, 0]}
        self._orig = CADFT.prepare

    def install(self):
        spy = self

        def prepare(loss, trainer, batches):
            extras = spy._orig(loss, trainer, batches)
            for x in extras:
                for k, e, w in zip(x["domain"].tolist(), x["index"].tolist(), x["w"].tolist()):
                    s = spy.sums[spy.flags.get((k, e), False)]
                    s[0] += w
                    s[1] += 1
            return extras

        CADFT.prepare = prepare

    def uninstall(self):
        CADFT.prepare = self._orig

    def flag(self, trainer, bad_prompts: set):
        self.flags = {}
        tok = trainer.tokenizer
        for k, ts in enumerate(trainer.train_sets):
            for e in range(ts.size):
                prompt = tok.decode(
                    ts.data.input_ids[e][: ts.data.prompt_len[e]], skip_special_tokens=True
                )
                self.flags[(k, e)] = prompt.strip() in bad_prompts
        self.sums = {True: [0.0, 0], False: [0.0, 0]}

    def means(self):
        return {flag: s[0] / s[1] if s[1] else float("nan") for flag, s in self.sums.items()}


def run_one(
    sc: dict,
    bad: set,
    method: str,
    seed: int,
    steps: int,
    out: Path,
    spy: WeightSpy,
    model: str = "builtin",
    lr: float = 5e-4,
) -> dict:
    raw = {
        "output_dir": str(out),
        "seed": seed,
        "max_steps": steps,
        "resume": "never",
        "progress": False,
        "model": {"name_or_path": model},
        "datasets": sc["datasets"]["clean" if method == "sft-clean" else "noisy"],
        "evals": sc["evals"],
        "mixer": {"name": "proportional"},
        "loss": METHODS[method],
        "train": {
            "batch_size": 16,
            "lr": lr,
            "schedule": "cosine",
            "warmup_ratio": 0.1,
            "max_length": 128,
            "eval_every": 0,
            "log_every": 1,
        },
    }
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    trainer = Trainer(config.load(data=raw))
    if method.startswith("cadft"):
        spy.flag(trainer, bad)
    summary = trainer.run()
    records = [json.loads(x) for x in open(out / "metrics.jsonl")]
    gn = np.array([r["train"]["grad_norm"] for r in records if "train" in r])
    gn = gn[max(1, len(gn) // 10) :]  # skip the LR warm-up
    res = {
        "method": method,
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        "acc0": records[0]["eval"][sc["target"]]["accuracy"],
        "acc": summary["final_eval"][sc["target"]]["accuracy"],
        "loss": summary["final_eval"][sc["target"]]["loss"],
        "gn_mean": float(gn.mean()),
        "gn_var": float(gn.var()),
        "gn_cv": float(gn.std() / gn.mean()),
    }
    if method.startswith("cadft"):
        m = spy.means()
        res.update(w_bad=m[True], w_clean=m[False])
        rw = out / "rewrites.jsonl"
        recs = [json.loads(x) for x in open(rw)] if rw.exists() else []
        res.update(rewrites=len(recs), rewrites_bad=sum(r["prompt"].strip() in bad for r in recs))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 scenario, 1 seed")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--noise", type=float, default=0.3, help="share of corrupted targets")
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--scenarios", nargs="+", default=["arithmetic-noisy", "wordprob-foreign"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument(
        "--work",
        default=str(Path(tempfile.gettempdir()) / "mixtune-bench-cadft"),
        help="run directories and generated data",
    )
    ap.add_argument("--out", default=None, help="raw results JSON (default: <work>/results.json)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seeds, args.scenarios = 40, [0], args.scenarios[:1]
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spy = WeightSpy()
    spy.install()
    results = {}
    for name in args.scenarios:
        sc, bad = scenario(name, work, args.noise, args.examples)
        rows = []
        for seed in args.seeds:
            for method in args.methods:
                res = run_one(
                    sc,
                    bad,
                    method,
                    seed,
                    args.steps,
                    work / f"{name}-{method}-{seed}",
                    spy,
                    args.model,
                    args.lr,
                )
                rows.append(res)
                print(json.dumps({"scenario": name, **res}), flush=True)
        results[name] = rows
    spy.uninstall()
    out = Path(args.out or work / "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(table(results))


def table(results: dict) -> str:
    lines = []
    for name, rows in results.items():
        lines.append(f"\n{name}: median over seeds (per-seed final accuracy in brackets)\n")
        lines.append(
            "| method | accuracy start -> end | eval CE | grad-norm mean | var | CV | "
            "w corrupted / clean | rewrites (on corrupted) | s/run |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for m in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["method"] == m]

            def med(key, rs=rs):
                return statistics.median(r[key] for r in rs)

            per = ", ".join(f"{r['acc']:.3f}" for r in rs)
            w = f"{med('w_bad'):.3f} / {med('w_clean'):.3f}" if "w_bad" in rs[0] else "-"
            rw = (
                f"{med('rewrites'):.0f} ({med('rewrites_bad'):.0f})" if "rewrites" in rs[0] else "-"
            )
            lines.append(
                f"| {m} | {med('acc0'):.3f} -> {med('acc'):.3f} [{per}] | "
                f"{med('loss'):.3f} | {med('gn_mean'):.3f} | {med('gn_var'):.3g} | "
                f"{med('gn_cv'):.3f} | {w} | {rw} | {med('seconds'):.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
