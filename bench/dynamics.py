"""DynaMiCS vs the paper's fixed-mixture sweep on built-in scenarios: feasibility, gain, cost.

    python bench/dynamics.py                   # 10 scenarios x 2 seeds, 40 steps per run
    python bench/dynamics.py --quick           # smoke: 3 scenarios, 1 seed, 24 steps
    python bench/dynamics.py --jobs 2 --seeds 3 --out bench/results/dynamics.md

Each scenario (the paper's App. C at toy scale) names 1-3 target domains, the training datasets
(the targets' data with a sample budget, plus two non-target "regularisers") and 3-4 constraint
domains. Every run fine-tunes the built-in base model for ``--steps`` steps (full fine-tuning,
constant LR), evaluates every domain every ``steps/8`` steps, and reports its best feasible
checkpoint (``mixtune.eval.constraints.select_best_feasible``): every constraint at or under its
reference and the summed target loss below the base model's; infeasible runs score 0.

References: the base model's evaluation loss plus ``--slack`` nats (default 0.05), given to
every run (DynaMiCS plans against the same numbers). With strict references (``--slack 0``)
nearly nothing is feasible here: the tiny base model is over-fitted to its pre-training
domains, and even training only on the regularisers raises their held-out losses by ~0.03.

Methods, per scenario and seed: DynaMiCS (``no_warmup`` schedule, ``c_max`` = 128·steps/2048,
the paper's ratio; other options at their defaults) and the paper's fixed baselines: target
mass w ∈ {0, .2, .5, .8, 1} split uniformly or by sample count over the targets, 1 − w
uniformly over the regularisers (duplicates skipped: 5-9 runs). Reported: feasibility rate and
median relative target-loss reduction (and perplexity reduction) at the best feasible
checkpoint for DynaMiCS; for the best single fixed configuration (the (scheme, w) with the
highest feasibility rate over all scenarios and seeds, ties by gain); for the pool of every
fixed run; and for the per-scenario oracle (best of the sweep: 5-9x the cost). Cost: wall time
of the DynaMiCS run / median wall time of the fixed runs of the same scenario and seed (runs
of a group go through the same worker pool, so they share the machine's load), and the probe
training steps as a multiple of the run's own steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, median, pin_threads, run_worker, table  # noqa: E402

SCENARIOS = [  # (name, targets with sample budgets, regulariser datasets, constraint domains)
    ("s01", {"code": 1000}, ["dialogue", "trivia"], ["dialogue", "trivia", "definitions"]),
    (
        "s02",
        {"word_problems": 1000},
        ["arithmetic", "definitions"],
        ["arithmetic", "definitions", "trivia"],
    ),
    ("s03", {"safety": 800}, ["dialogue", "trivia"], ["dialogue", "trivia", "definitions"]),
    ("s04", {"code": 400}, ["definitions", "arithmetic"], ["definitions", "arithmetic", "safety"]),
    ("s05", {"word_problems": 600}, ["trivia", "dialogue"], ["trivia", "dialogue", "arithmetic"]),
    ("s06", {"definitions": 2000}, ["dialogue", "trivia"], ["dialogue", "trivia", "safety"]),
    ("s07", {"arithmetic": 2000}, ["trivia", "definitions"], ["trivia", "definitions", "safety"]),
    (
        "s08",
        {"code": 600, "word_problems": 600},
        ["dialogue", "arithmetic"],
        ["dialogue", "arithmetic", "trivia"],
    ),
    (
        "s09",
        {"code": 500, "safety": 300},
        ["trivia", "definitions"],
        ["trivia", "definitions", "dialogue"],
    ),
    (
        "s10",
        {"code": 500, "word_problems": 500, "safety": 300},
        ["trivia", "arithmetic"],
        ["trivia", "arithmetic", "definitions", "dialogue"],
    ),
]
MASSES = (0.0, 0.2, 0.5, 0.8, 1.0)
DOMAINS = ("arithmetic", "code", "definitions", "dialogue", "safety", "trivia", "word_problems")


def fixed_mixtures(targets: dict, regs: list[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """The paper's sweep: ({label: weights} without duplicates, {every label: its run})."""
    runs, alias, seen = {}, {}, {}
    for scheme in ("uniform", "proportional"):
        for w in MASSES:
            weights = {r: (1 - w) / len(regs) for r in regs}
            total = sum(targets.values())
            for t, n in targets.items():
                weights[t] = w * (1 / len(targets) if scheme == "uniform" else n / total)
            key = tuple(round(weights[k], 9) for k in sorted(weights))
            label = f"{scheme[:4]}-w{round(100 * w)}"  # no dots: labels name files
            if key not in seen:
                seen[key] = label
                runs[label] = {k: v for k, v in weights.items() if v > 0}
            alias[label] = seen[key]
    return runs, alias


def evals(names, args, roles=None, refs=None) -> list[dict]:
    return [
        {
            "name": d,
            "path": f"builtin:{d}",
            "split": "eval",
            "batches": args.eval_batches,
            "batch_size": 8,
            "accuracy": False,
            "role": (roles or {}).get(d, "monitor"),
            "reference": (refs or {}).get(d),
        }
        for d in names
    ]


def train_section(args) -> dict:
    every = max(1, args.steps // 8)
    return {
        "batch_size": args.batch_size,
        "lr": args.lr,
        "schedule": "constant",
        "max_length": args.max_length,
        "eval_every": every,
        "log_every": every,
        "save_every": 0,
    }


def run_config(scn, seed: int, mixer: dict, args, refs: dict, out_dir: Path) -> dict:
    _, targets, regs, cons = scn
    datasets = [{"name": t, "path": f"builtin:{t}", "max_examples": n} for t, n in targets.items()]
    datasets += [{"name": r, "path": f"builtin:{r}", "max_examples": 2000} for r in regs]
    roles = {**{t: "target" for t in targets}, **{c: "constraint" for c in cons}}
    cons_refs = {c: refs[c] + args.slack for c in cons}
    return {
        "output_dir": str(out_dir),
        "seed": seed,
        "max_steps": args.steps,
        "resume": "never",
        "progress": False,
        "model": {"name_or_path": "builtin"},
        "datasets": datasets,
        "evals": evals(list(targets) + cons, args, roles, cons_refs),
        "mixer": mixer,
        "train": train_section(args),
    }


def base_losses(seed: int, args, work: Path) -> dict[str, float]:
    """The base model's loss on every domain's evaluation batches (as the runs see them)."""
    from mixtune import config
    from mixtune.engine.loop import Trainer

    raw = {
        "output_dir": str(work / f"base-seed{seed}"),
        "seed": seed,
        "max_steps": 1,
        "progress": False,
        "model": {"name_or_path": "builtin"},
        "datasets": [{"name": "x", "path": "builtin:arithmetic", "max_examples": 8}],
        "evals": evals(DOMAINS, args),
        "train": train_section(args),
    }
    t = Trainer(config.load(data=raw))
    return {d: m["loss"] for d, m in t.evaluate(accuracy=False, use_cache=False).items()}


def worker(cfg_path: str, threads: int) -> None:
    """Run one config; print one JSON line with the numbers the report needs."""
    pin_threads(threads)
    from mixtune import config
    from mixtune.engine.loop import Trainer
    from mixtune.engine.rundir import read_metrics

    cfg = json.loads(Path(cfg_path).read_text())
    summary = Trainer(config.load(data=cfg)).run()
    best = summary["best_feasible"]
    mix = [r["mixer"] for r in read_metrics(cfg["output_dir"]) if "mixer" in r]
    errs = [abs(e) for m in mix for e in m.get("prediction_error", {}).values()]
    errs = [sum(errs) / len(errs)] if errs else []
    print(
        json.dumps(
            {
                "feasible": best["feasible"],
                "loss_red": best["target_reduction"],
                "ppl_red": best["target_ppl_reduction"],
                "step": best["step"],
                "seconds": summary["seconds"],
                "probe_steps": sum(m.get("probe_steps", 0) for m in mix) * len(cfg["datasets"]),
                "mixer_seconds": sum(
                    m.get("probe_seconds", 0) + m.get("solve_seconds", 0) for m in mix
                ),
                "updates": len(mix),
                "updates_feasible": sum(bool(m.get("feasible")) for m in mix),
                "pred_err": median(errs) if errs else None,
                "final_weights": summary["weights"],
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 scenarios, 1 seed, 24 steps")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--scenarios", default="all", help="comma-separated names, or all")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--slack", type=float, default=0.05, help="nats added to base references")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    ap.add_argument("--threads", type=int, default=1, help="threads per run")
    ap.add_argument("--work", default="/tmp/mixtune-bench-dynamics")
    ap.add_argument("--out", default=None, help="markdown report (default: print only)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.threads)
    if args.quick:
        args.steps, args.seeds = 24, 1
        args.scenarios = "s01,s08,s10" if args.scenarios == "all" else args.scenarios
    from mixtune.builtin import base_model_path

    if not (base_model_path() / "config.json").is_file():
        sys.exit("the built-in base model is not built yet (scripts/pretrain_base.py)")
    pin_threads(args.threads)
    scns = [s for s in SCENARIOS if args.scenarios == "all" or s[0] in args.scenarios.split(",")]
    work = Path(args.work) / (
        f"T{args.steps}-lr{args.lr:g}-b{args.batch_size}"
        f"-L{args.max_length}-e{args.eval_batches}-s{args.slack:g}"
    )
    work.mkdir(parents=True, exist_ok=True)
    c_max = max(1, round(128 * args.steps / 2048))

    jobs = []  # (scenario, seed, label, config path); DynaMiCS first in each group
    aliases = {}  # scenario -> {fixed config label: the label of the identical run}
    for seed in range(args.seeds):
        refs = base_losses(seed, args, work)
        for scn in scns:
            name, targets, regs, _ = scn
            methods = {"dynamics": {"name": "dynamics", "schedule": "no_warmup", "c_max": c_max}}
            runs, alias = fixed_mixtures(targets, regs)
            aliases[name] = alias
            methods.update({k: {"name": "fixed", "weights": w} for k, w in runs.items()})
            for label, mixer in methods.items():
                stem = work / f"{name}-seed{seed}-{label}"
                cfg = run_config(scn, seed, mixer, args, refs, stem)
                stem.with_suffix(".json").write_text(json.dumps(cfg))
                jobs.append((name, seed, label, stem.with_suffix(".json")))

    def go(job):
        name, seed, label, path = job
        cached = path.with_suffix(".result.json")
        if cached.is_file():
            return job, json.loads(cached.read_text())
        res = run_worker(
            [__file__, "--worker", str(path), "--threads", str(args.threads)],
            args.threads,
            work / "log.txt",
        )
        cached.write_text(json.dumps(res))
        print(
            f"{name} seed{seed} {label:12s} feasible={res['feasible']!s:5s} "
            f"loss_red={res['loss_red']:+.3f} {res['seconds']:.0f}s",
            file=sys.stderr,
        )
        return job, res

    load_before = loadavg()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(go, jobs))
    report = render(results, aliases, scns, args, load_before, c_max)
    if args.out:
        Path(args.out).write_text(report)
    print(report)


def render(results, aliases, scns, args, load_before: str, c_max: int) -> str:
    by = {(n, s, lab): r for (n, s, lab, _), r in results}
    seeds = sorted({s for (_, s, _) in by})
    groups = [(n, s) for s in seeds for n, *_ in scns]
    fixed = sorted({lab for (_, _, lab) in by if lab != "dynamics"})
    labels = sorted({lab for a in aliases.values() for lab in a})  # all 10 (scheme, w)

    def stats(runs):
        runs = [r for r in runs if r is not None]
        if not runs:
            return 0.0, 0.0, 0.0, 0
        return (
            sum(r["feasible"] for r in runs) / len(runs),
            median([r["loss_red"] for r in runs]),
            median([r["ppl_red"] for r in runs]),
            len(runs),
        )

    def fixed_runs(n, s):
        return [by[(n, s, lab)] for lab in fixed if (n, s, lab) in by]

    dyn = [by[(n, s, "dynamics")] for n, s in groups]
    # a configuration identical to another one in a scenario (e.g. proportional = uniform with
    # one target) counts with that run, so every configuration covers every scenario
    per_cfg = {lab: stats([by.get((n, s, aliases[n][lab])) for n, s in groups]) for lab in labels}
    best = max(per_cfg, key=lambda k: per_cfg[k][:2])
    pool = [r for n, s in groups for r in fixed_runs(n, s)]
    oracle = [
        max(fixed_runs(n, s), key=lambda r: (r["feasible"], r["loss_red"])) for n, s in groups
    ]
    cost = [
        by[(n, s, "dynamics")]["seconds"] / median([r["seconds"] for r in fixed_runs(n, s)])
        for n, s in groups
    ]
    probe_x = median([r["probe_steps"] / args.steps for r in dyn])

    def row(name, st, c):
        return [
            name,
            f"{100 * st[0]:.0f}% ({st[3]} runs)",
            f"{100 * st[1]:.1f}%",
            f"{100 * st[2]:.1f}%",
            c,
        ]

    rows = [
        row("DynaMiCS (no warm-up)", stats(dyn), f"{median(cost):.2f}x"),
        row(f"best fixed config ({best})", per_cfg[best], "1x"),
        row("all fixed runs (pool)", stats(pool), "1x each"),
        row("oracle: best of the sweep per scenario", stats(oracle), "5-9x"),
    ]
    scen_rows = []
    for (n, s), r, o, c in zip(groups, dyn, oracle, cost):
        fr = fixed_runs(n, s)
        scen_rows.append(
            [
                n,
                s,
                "yes" if r["feasible"] else "no",
                f"{100 * r['loss_red']:.1f}%",
                f"{r['updates_feasible']}/{r['updates']}",
                "n/a" if r["pred_err"] is None else f"{r['pred_err']:.3f}",
                f"{sum(x['feasible'] for x in fr)}/{len(fr)}",
                f"{100 * o['loss_red']:.1f}%",
                f"{c:.2f}x",
            ]
        )
    cfg_rows = [
        [lab, f"{100 * f:.0f}%", f"{100 * m:.1f}%", k]
        for lab, (f, m, _, k) in sorted(per_cfg.items())
    ]
    d_feas, b_feas = stats(dyn)[0], per_cfg[best][0]
    cmd = " ".join(["python bench/dynamics.py", *sys.argv[1:]])
    return "\n".join(
        [
            "# DynaMiCS benchmark",
            "",
            f"Command: `{cmd}`  ",
            f"Machine: 2-core CPU, torch 2.13 ({platform.machine()}); {args.jobs} runs in parallel"
            f" x {args.threads} thread; load average before {load_before}, after {loadavg()} "
            "(the machine was shared).  ",
            f"Runs: {len(scns)} scenarios x {len(seeds)} seeds; built-in base model, full "
            f"fine-tuning, {args.steps} steps, batch {args.batch_size}, lr {args.lr:g} constant, "
            f"max length {args.max_length}; every domain evaluated every "
            f"{max(1, args.steps // 8)} steps on {args.eval_batches} batches of 8; constraint "
            f"references = base loss + {args.slack:g} nats; DynaMiCS c_max = {c_max}.",
            "",
            "## Summary (medians over scenario x seed; infeasible runs score 0)",
            "",
            table(
                ["method", "feasibility", "target-loss reduction", "target-PPL reduction", "cost"],
                rows,
            ),
            "",
            f"Feasibility: DynaMiCS {100 * d_feas:.0f}% vs best fixed {100 * b_feas:.0f}% "
            f"({100 * (d_feas - b_feas):+.0f} points; target: +20). Cost: {median(cost):.2f}x "
            f"the wall time of one fixed run (target: <= 1.5x); probe training steps = "
            f"{probe_x:.2f}x the run's own steps.",
            "",
            "## Per scenario",
            "",
            table(
                [
                    "scenario",
                    "seed",
                    "DynaMiCS feasible",
                    "DynaMiCS loss red.",
                    "predicted-feasible updates",
                    "mean abs pred. error",
                    "fixed feasible",
                    "oracle loss red.",
                    "cost",
                ],
                scen_rows,
            ),
            "",
            "## Fixed configurations (all scenarios and seeds)",
            "",
            table(["config", "feasibility", "median loss red.", "runs"], cfg_rows),
            "",
        ]
    )


if __name__ == "__main__":
    main()
