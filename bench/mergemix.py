"""MergeMix on the built-in domains: proxy fidelity (Spearman ρ), mixture quality, search cost.

    python bench/mergemix.py                 # ~20-30 min on 2 idle cores
    python bench/mergemix.py --quick         # smoke: 16-step runs, 7 mixtures, a few minutes
    python bench/mergemix.py --threads 1 --steps 300 --out /tmp/mm-bench

Part A (the built-in pretrained base, ``model.name_or_path: builtin``; a random init of the same
shape with ``--random-init`` or when the base is not built): plan on four built-in datasets
(arithmetic, word_problems, code, dialogue) with the objective "mean of the target domains'
losses" (arithmetic, word_problems, code eval splits) normalised by ``--normalize`` (default
``spread``: z-scores over the seed merges; ``base``: ratios to the base model), experts of
steps/4 constant-LR steps, 20 seed merges, the default ``gbt`` surrogate and the default
selection (``--select measured``: α* is the best measured merge); then train 10 mixtures for
real for ``--steps`` steps each -- MergeMix's α*, the α* the paper's rule picks from the same
merges (``mergemix-surrogate``: the gbt optimum over the whole simplex), uniform, proportional
and Dirichlet(1) draws -- and compare: Spearman ρ(merged proxy, real) and ρ(surrogate, real)
on the planning objective, on the ``base``-normalised objective, on the plain mean target loss
and per domain; each domain's share of the objective; the real objective and rank of each named
mixture; the search cost against the grid of full runs it replaces (tokens, and seconds
measured in this process: the grid's seconds = R × the median real run).

Part B (cross-scale, both models built from configs, nothing pretrained): the same plan on a
small random-init Llama (hidden 64, 2 layers); its 10 mixtures trained for real on the small
model and on a larger one (4 layers: twice the non-embedding parameters): ρ(proxy small, real
large), ρ(real small, real large) and MergeMix's rank on the large model.

Everything runs in this process with ``torch.set_num_threads(--threads)``; results go to
bench/results/mergemix.md (``--results``) and the run directories to ``--out``.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core box spinning barriers make
# every other process (and this one) much slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, pin_threads, table  # noqa: E402

DATASETS = {"arithmetic": 2000, "word_problems": 2000, "code": 1500, "dialogue": None}
TARGETS = ("arithmetic", "word_problems", "code")
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
SMALL_SHAPE = {**BASE_SHAPE, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2}
LARGE_SHAPE = {**SMALL_SHAPE, "num_hidden_layers": 4}  # 2x the non-embedding parameters


def plan_dict(
    out: Path,
    model: dict,
    steps: int,
    mixtures: int,
    batches: int,
    n_seeds: int,
    scales: dict | None = None,
    normalize: str = "spread",
    select: str = "measured",
) -> dict:
    run = {
        "output_dir": str(out / "train"),
        "seed": 0,
        "max_steps": steps,
        "progress": False,
        "model": model,
        "datasets": [
            {"name": n, "path": f"builtin:{n}", **({"max_examples": m} if m else {})}
            for n, m in DATASETS.items()
        ],
        "evals": [
            {
                "name": n,
                "path": f"builtin:{n}",
                "split": "eval",
                "role": "target",
                "batches": batches,
                "batch_size": 16,
            }
            for n in TARGETS
        ]
        + [
            {
                "name": "trivia",
                "path": "builtin:trivia",
                "split": "eval",
                "role": "monitor",
                "batches": batches,
                "batch_size": 16,
            }
        ],
        "mixer": {"name": "uniform"},
        "train": {
            "batch_size": 16,
            "lr": 5e-4,
            "schedule": "cosine",
            "max_length": 256,
            "eval_every": 0,
            "log_every": 10,
        },
    }
    return {
        "run": run,
        "output_dir": str(out),
        "progress": False,
        "experts": {"steps": max(1, steps // 4)},
        "objective": {"normalize": normalize},
        "search": {"surrogate": "gbt", "n_seeds": n_seeds, "select": select},
        "validate": {"n_mixtures": mixtures, "scales": scales},
    }


def run_part(name: str, raw: dict) -> dict:
    from mixtune.planners.mergemix import search
    from mixtune.planners.mergemix import surrogate as sg
    from mixtune.planners.mergemix.config import load
    from mixtune.planners.mergemix.planner import Planner, plan
    from mixtune.planners.mergemix.validate import validate_plan

    pc, run = load(None, data=raw)
    t0 = time.perf_counter()
    planner = Planner(pc, run)
    result = plan(pc, run, planner)
    # the paper's rule on the same seed merges (cached: no new evaluations): the surrogate's
    # optimum over the whole simplex, unmeasured -- validated alongside
    K = len(planner.names)
    faithful = search.run(
        planner.evaluator,
        K,
        objective=planner.objective,
        bounds=planner.bounds,
        surrogate=pc.search.surrogate,
        n_seeds=pc.search.n_seeds,
        n_candidates=pc.search.n_candidates,
        seed=run.seed,
        loo=False,
        select="surrogate",
    )
    extra_mix = [
        {
            "label": "mergemix-surrogate",
            "weights": dict(zip(planner.names, faithful.alpha.tolist())),
        }
    ]
    raw = {**raw, "validate": {**raw["validate"], "mixtures": extra_mix}}
    pc, _ = load(None, data=raw)
    planner.pc = pc
    plan_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    v = validate_plan(pc, run, result, planner)
    val_s = time.perf_counter() - t1
    # LOO quality of every surrogate on the same evaluated merges (no extra evaluations)
    table_ = result["table"]
    X = [t["alpha"] for t in table_]
    loo = {}
    for s in ("gbt", "gp", "quadratic"):
        ys = [[t["scores"][d]["loss"] for t in table_] for d in TARGETS]
        loo[s] = [sg.leave_one_out(s, X, y)["r2"] for y in ys]
    # the same runs scored with the other objectives: ratios to the base model, plain mean
    from scipy.stats import spearmanr

    base = result["base"]
    other = {
        "base-normalised objective": {d: 1.0 / base[d]["loss"] for d in TARGETS},
        "plain mean target loss": {d: 1.0 for d in TARGETS},
    }
    extra = []
    for scale, reals in v["real_scores"].items():
        for what, w in other.items():
            px = [sum(w[d] * m["proxy_scores"][d]["loss"] for d in TARGETS) for m in v["mixtures"]]
            rl = [sum(w[d] * x[d]["loss"] for d in TARGETS) for x in reals]
            r = spearmanr(px, rl)
            extra.append(
                {
                    "what": f"proxy vs real ({scale}), {what}",
                    "rho": float(r.statistic),
                    "p": float(r.pvalue),
                }
            )
    real_secs = []
    for scale in v["real"]:
        for m in v["mixtures"]:
            summ = json.loads(
                (Path(pc.output_dir) / "validate" / scale / m["label"] / "summary.json").read_text()
            )
            real_secs.append((scale, summ["seconds"]))
    return {
        "name": name,
        "result": result,
        "validation": v,
        "plan_s": plan_s,
        "val_s": val_s,
        "loo": loo,
        "real_secs": real_secs,
        "extra_rank": extra,
    }


def report(parts: list[dict], args, cmd: str, threads: int, base_kind: str) -> str:
    lines = [
        "# MergeMix benchmark",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: 2-core CPU, torch 2.13, {threads} thread(s), "
        f"load average at start {args.load0}, at end {loadavg()}; Python "
        f"{platform.python_version()}.  ",
        f"Part A base model: {base_kind}. Steps per real run: {args.steps}; experts: "
        f"{max(1, args.steps // 4)} constant-LR steps; {args.n_seeds} seed merges; "
        f"objective: mean target loss on {', '.join(TARGETS)} (eval splits, "
        f"{args.batches}x16 examples each), `normalize: {args.normalize}`; "
        f"`select: {args.select}`; {args.mixtures} mixtures trained for real.",
        "",
    ]
    for p in parts:
        r, v = p["result"], p["validation"]
        c = r["cost"]
        lines += [
            f"## {p['name']}",
            "",
            "alpha* = "
            + ", ".join(f"{n} {a:.3f}" for n, a in zip(r["datasets"], r["alpha"]))
            + f" (selected by: {r['selected_by']}; trust radius "
            + (f"{r['trust_radius']:.3f}" if r.get("trust_radius") else "none")
            + f"; the surrogate's proposal measured {r['proposal']['measured_objective']:.4f})",
            "",
            "Objective share per domain (|w|·sd / Σ|w|·sd): seed merges "
            + ", ".join(f"{d} {x:.2f}" for d, x in r["objective"]["shares"].items())
            + "; "
            + "; ".join(
                f"{what} " + ", ".join(f"{d} {x:.2f}" for d, x in sh.items())
                for what, sh in v["shares"].items()
            ),
            "",
        ]
        lines += [
            table(
                [
                    "mixture",
                    *r["datasets"],
                    "surrogate",
                    "merged proxy",
                    *[f"real ({s})" for s in v["real"]],
                ],
                [
                    [
                        m["label"],
                        *[f"{a:.2f}" for a in m["alpha"]],
                        m["surrogate"],
                        m["proxy"],
                        *[v["real"][s][i] for s in v["real"]],
                    ]
                    for i, m in enumerate(v["mixtures"])
                ],
            ),
            "",
        ]
        lines += [
            table(
                ["comparison", "Spearman ρ", "p"],
                [
                    [x["what"], x["rho"], x["p"]]
                    for x in v["rank"] + p["extra_rank"] + v["rank_by_domain"]
                ],
            ),
            "",
        ]
        labels = [m["label"] for m in v["mixtures"]]
        draws = [i for i, x in enumerate(labels) if x.startswith("d")]
        for s, ys in v["real"].items():
            order = sorted(range(len(ys)), key=lambda i: ys[i])
            rank = {labels[i]: k + 1 for k, i in enumerate(order)}
            named = ["mergemix", "mergemix-surrogate", "uniform", "proportional"]
            text = ", ".join(
                f"{x} {ys[labels.index(x)]:.4f} (#{rank[x]})" for x in named if x in labels
            )
            if draws:
                b = min(draws, key=lambda i: ys[i])
                text += f", best random draw {labels[b]} {ys[b]:.4f} (#{rank[labels[b]]})"
            lines.append(
                f"- real objective ({s}), lower is better, rank of {len(ys)}: {text}; "
                f"best of all: {labels[order[0]]}."
            )
        base_secs = [s for sc, s in p["real_secs"] if sc == "base"]
        med = statistics.median(base_secs)
        search_s = c["expert_seconds"] + c["eval_seconds"]
        lines += [
            "",
            f"- cost: {c['search_tokens']:,} expert tokens vs {c['grid_tokens']:,} "
            f"for the {c['grid_runs']}-run grid (shares in steps of 1/{c['grid_resolution']}"
            f"): **{c['token_ratio']:.1f}x** fewer tokens; {c['n_evals']} merged "
            f"evaluations. Seconds (measured here): experts {c['expert_seconds']:.0f} + "
            f"merged evals {c['eval_seconds']:.0f} = {search_s:.0f} s vs "
            f"{c['grid_runs']} x {med:.0f} s (median real run) = "
            f"{c['grid_runs'] * med:.0f} s: **{c['grid_runs'] * med / search_s:.1f}x**.",
            f"- surrogate LOO R² on the {len(r['table'])} merges (per target domain "
            f"{', '.join(TARGETS)}): "
            + "; ".join(f"{s} " + "/".join(f"{x:.2f}" for x in xs) for s, xs in p["loo"].items()),
            f"- wall: plan {p['plan_s']:.0f} s, validation runs {p['val_s']:.0f} s.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="steps of a real run (default 200)")
    ap.add_argument("--mixtures", type=int, default=None, help="trained mixtures (default 10)")
    ap.add_argument("--batches", type=int, default=None, help="eval batches of 16 (default 8)")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--no-cross-scale", action="store_true")
    ap.add_argument("--normalize", default="spread", choices=["spread", "base", "none"])
    ap.add_argument("--select", default="measured", choices=["measured", "surrogate"])
    ap.add_argument("--out", default="/tmp/mixtune-bench-mergemix")
    ap.add_argument(
        "--results",
        default=None,
        help="markdown output (default bench/results/mergemix.md; --quick: in --out)",
    )
    args = ap.parse_args()
    args.results = args.results or (
        str(Path(args.out) / "mergemix.md")
        if args.quick
        else str(Path(__file__).parent / "results" / "mergemix.md")
    )
    args.steps = args.steps or (16 if args.quick else 200)
    args.mixtures = args.mixtures or (7 if args.quick else 10)
    args.batches = args.batches or (1 if args.quick else 8)
    args.n_seeds = 8 if args.quick else 20
    args.load0 = loadavg()
    pin_threads(args.threads)
    from mixtune.builtin import base_model_path

    have_base = (base_model_path() / "config.json").is_file()
    random_init = args.random_init or not have_base
    model = (
        {"name_or_path": "builtin", "tokenizer": "builtin", "config": BASE_SHAPE}
        if random_init
        else {"name_or_path": "builtin"}
    )
    base_kind = (
        "random init of the built-in shape (base model not built)"
        if random_init
        else "the built-in pretrained base (1.6M-parameter Llama)"
    )
    out = Path(args.out)
    parts = [
        run_part(
            "Part A: proxy fidelity and quality on the built-in base",
            plan_dict(
                out / "A",
                model,
                args.steps,
                args.mixtures,
                args.batches,
                args.n_seeds,
                normalize=args.normalize,
                select=args.select,
            ),
        )
    ]
    if not args.no_cross_scale:
        small = {"name_or_path": "builtin", "tokenizer": "builtin", "config": SMALL_SHAPE}
        big = [f"model.config.{k}={v}" for k, v in LARGE_SHAPE.items() if SMALL_SHAPE[k] != v]
        parts.append(
            run_part(
                "Part B: cross-scale (plan on hidden 64 x 2 layers; "
                "real runs also on 64 x 4 layers)",
                plan_dict(
                    out / "B",
                    small,
                    args.steps,
                    args.mixtures,
                    args.batches,
                    args.n_seeds,
                    scales={"large": big},
                    normalize=args.normalize,
                    select=args.select,
                ),
            )
        )
    cmd = "python bench/mergemix.py " + " ".join(sys.argv[1:])
    text = report(parts, args, cmd.strip(), args.threads, base_kind)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
