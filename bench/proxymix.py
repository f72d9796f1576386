"""ProxyMix benchmark: a replay controller learned on a small proxy, used on the built-in base.

    python bench/proxymix.py            # full: 3 sequences x 2 seeds, ~30 min on 2 cores
    python bench/proxymix.py --quick    # smoke version, a few minutes
    python bench/proxymix.py --ship     # learn the shipped controller (mixer.controller:
                                        #   builtin) with the batched learner, write its card
    python bench/proxymix.py --controller builtin --methods ProxyMix 'untrained controller' \
        'fixed 20%' 'fixed 50%'         # the shipped controller on the target, no learning

Setting: configs/proxymix.yaml -- tasks arithmetic, word_problems, trivia (three orders), safety
evaluation + an always-accessible safety buffer, replay buffers of 100 examples. Proxy: a
0.39M-parameter llama (hidden 64, 2 layers) pre-trained for 300 steps by the config's warm-up;
target: the built-in 1.6M-parameter base. One controller is learned (seed 0) and frozen; each
method then runs every sequence on the target with seeds 0 and 1. Methods: no replay, fixed
replay 10/20/50% (uniform over buffers), the loss-increase heuristic, and ProxyMix (with the
pre-transfer check; if the check falls back, the controller is also run without it), and an
untrained controller (``policy: random``, seeded by the run seed) to show whether learning moved
the policy. ``--learner batched`` (default) learns with the variance-reduced learner
(LEARNER["batched"]: 10-step proxy stages, 4 episodes per update in antithetic pairs on a
shared data seed, the batch baseline, clipped PPO, a greedy held-out curve on 12 episodes);
``--learner learned_reward`` the same with the reward tried in issue 21 (``terminal_metric:
loss_learned``, safety weighted 0.25);
``--learner faithful`` with the config's one-episode REINFORCE.
Results: bench/results/proxymix.md (and the raw numbers in WORK/bench.json).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import loadavg, pin_threads, table  # noqa: E402

BASELINES = [
    ("no replay", ["mixer.policy=fixed", "mixer.replay_ratio=0"]),
    ("fixed 10%", ["mixer.policy=fixed", "mixer.replay_ratio=0.1"]),
    ("fixed 20%", ["mixer.policy=fixed", "mixer.replay_ratio=0.2"]),
    ("fixed 50%", ["mixer.policy=fixed", "mixer.replay_ratio=0.5"]),
    ("loss-increase heuristic", ["mixer.policy=loss_increase"]),
]
ORDER = ["no replay", "fixed 20%", "fixed 50%", "fixed 10%", "loss-increase heuristic"]
UNTRAINED = ("untrained controller", ["mixer.policy=random"])
LEARNER = {
    "faithful": [],
    "batched": [  # a cheaper proxy episode (10-step stages, 2 eval batches) affords 40
        "learn.proxy.steps_per_stage=10",
        "learn.proxy.eval_batches=2",
        "learn.episodes=40",
        "learn.episodes_per_update=4",
        "learn.antithetic=true",
        "learn.baseline=batch",
        "learn.vary_data_seed=true",
        "learn.algorithm=ppo",
        "learn.ppo_epochs=4",
        "learn.lr=1e-2",
        "learn.eval_every=5",
        "learn.eval_episodes=12",
    ],
}
# issue 21, tried and not shipped: a reward that values learning the new task (the terminal's
# AA term from before each task's stage; safety weighted 0.25, since its ratios over a tiny
# start loss outweighed the current task's gain 1-3x on the proxy). On the target it did not
# gain accuracy and lost safety (BENCHMARKS.md, bench/results/proxymix_builtin_loss_learned.md)
LEARNER["learned_reward"] = [
    *LEARNER["batched"],
    "learn.terminal_metric=loss_learned",
    "learn.lambda_safety=0.25",
    "learn.lambda_S=0.25",
]
BUILTIN = ROOT / "src/mixtune/mixers/proxymix/builtin"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke version (minutes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--episodes", type=int, default=None, help="RL episodes (default: config)")
    ap.add_argument("--work", default="/tmp/mixtune-bench-proxymix")
    ap.add_argument("--out", default=str(ROOT / "bench/results/proxymix.md"))
    ap.add_argument("--fresh", action="store_true", help="delete WORK first (else reuse runs)")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="subset of: ProxyMix, 'no replay', 'fixed 10%%', 'fixed 20%%', "
        "'fixed 50%%', 'loss-increase heuristic'",
    )
    ap.add_argument(
        "--target", default="builtin", help="target model directory (default: the built-in base)"
    )
    ap.add_argument("--learner", choices=sorted(LEARNER), default="batched")
    ap.add_argument(
        "--controller",
        choices=["learn", "builtin"],
        default="learn",
        help="learn a controller (default) or use the one shipped with mixtune",
    )
    ap.add_argument(
        "--ship",
        action="store_true",
        help="learn, then install the controller and its card as mixer.controller: builtin",
    )
    args = ap.parse_args()
    pin_threads(args.threads)
    from mixtune.builtin import base_model_path
    from mixtune.mixers.proxymix import setting as pxs
    from mixtune.mixers.proxymix.learn import learn
    from mixtune.mixers.proxymix.run import run
    from mixtune.rawconfig import read_yaml

    if args.target == "builtin" and not (base_model_path() / "config.json").is_file():
        sys.exit("the built-in base model is missing (src/mixtune/builtin/base/config.json)")
    work = Path(args.work) / ("quick" if args.quick else "full")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    raw = read_yaml(ROOT / "configs/proxymix.yaml")
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    common = [f"model.name_or_path={args.target}"]
    if args.quick:
        common += [
            "steps_per_stage=6",
            "transfer.probe_steps=3",
            "eval_batches=1",
            "learn.proxy.warmup.steps=30",
            "mixer.decisions=2",
            "sequences=[[word_problems,arithmetic,trivia]]",
        ]
    learner = list(LEARNER[args.learner])
    if args.episodes:
        learner.append(f"learn.episodes={args.episodes}")
    elif args.quick:
        learner = [*[o for o in learner if not o.startswith("learn.e")], "learn.episodes=2"]
        learner += ["learn.episodes_per_update=2"] if args.learner == "batched" else []
    t0 = time.perf_counter()
    learn_cc = pxs.load(data=raw, overrides=[*common, f"output_dir={work}/learn", *learner])
    episodes = learn_cc.learn.episodes
    returns, greedy = [], []
    if args.controller == "builtin":
        controller = "builtin"
        card = json.loads((BUILTIN / "card.json").read_text())
        returns, greedy = card["returns"], card["greedy"]
    else:
        controller = learn(learn_cc)
        ldir = work / "learn/learn"
        returns = [
            json.loads(ln) for ln in (ldir / "returns.jsonl").read_text().splitlines() if ln.strip()
        ]
        if (ldir / "greedy.json").is_file():
            greedy = json.loads((ldir / "greedy.json").read_text())
        if args.ship:
            ship(controller, ldir, learn_cc, [*common, *learner], args)
            return
    learn_wall = time.perf_counter() - t0

    methods = [("ProxyMix", ["mixer.policy=controller", f"mixer.controller={controller}"])]
    methods += sorted(BASELINES, key=lambda m: ORDER.index(m[0])) + [UNTRAINED]
    wanted = args.methods or (
        ["ProxyMix", "no replay", "fixed 20%"]
        if args.quick
        else ["ProxyMix", *[n for n, _ in BASELINES], UNTRAINED[0]]
    )
    if wanted:
        methods = [m for m in methods if m[0] in wanted]
    rows: dict[str, list[dict]] = {}
    reports: dict[str, list[dict]] = {}
    for seed in seeds:  # seed-major: a partial run still compares every method
        for name, extra in methods:
            key = name.replace(" ", "_").replace("%", "").replace("-", "_")
            cc = pxs.load(
                data=raw,
                overrides=[*common, *extra, f"seed={seed}", f"output_dir={work}/{key}-s{seed}"],
            )
            rep = run(cc)
            reports.setdefault(name, []).append(rep)
            rows.setdefault(name, []).extend(_sequences(cc, seed))
            if name == "ProxyMix" and rep["mixer"].get("policy") != "controller":
                cc = pxs.load(
                    data=raw,
                    overrides=[
                        *common,
                        *extra,
                        f"seed={seed}",
                        "transfer.check=false",
                        f"output_dir={work}/{key}_nocheck-s{seed}",
                    ],
                )
                run(cc)
                rows.setdefault("ProxyMix (controller, check off)", []).extend(_sequences(cc, seed))
    total = time.perf_counter() - t0
    pc = pxs.proxy_setting(learn_cc)
    cost = (reports.get("ProxyMix") or [{}])[0].get("policy_cost", {})
    setting = {
        "orders": learn_cc.orders(),
        "buffer_size": learn_cc.buffer_size,
        "steps": learn_cc.steps_per_stage,
        "batch": learn_cc.train.batch_size,
        "decisions": learn_cc.mixer.params.get("decisions"),
        "target": args.target,
        "target_params": cost.get("target_params") or 0,
        "proxy": {k: pc.model.config[k] for k in ("hidden_size", "num_hidden_layers")},
        "proxy_params": cost.get("proxy_params") or 0,
        "warmup": pc.warmup.steps,
    }
    result = {
        "setting": setting,
        "rows": rows,
        "returns": returns,
        "greedy": greedy,
        "controller": controller,
        "learner": args.learner,
        "argv": " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "learn_wall": learn_wall,
        "total_wall": total,
        "proxymix_reports": reports.get("ProxyMix", []),
        "seeds": seeds,
        "episodes": episodes,
        "quick": args.quick,
        "load": loadavg(),
    }
    (work / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report(result, args))
    print(f"wrote {args.out} ({total / 60:.1f} min)")


def _sequences(cc, seed: int) -> list[dict]:
    out, orders = [], cc.orders()
    for k, order in enumerate(orders):
        d = (
            Path(cc.output_dir)
            if len(orders) == 1
            else (Path(cc.output_dir) / f"seq-{k + 1}-{'-'.join(order)}")
        )
        r = json.loads((d / "results.json").read_text())
        out.append(
            {
                "seed": seed,
                "order": order,
                "AA": r["average_accuracy"],
                "F": r["forgetting"],
                "safety": (r.get("safety") or {}).get("final"),
                "loss_F": r["loss_forgetting"],
                "replay": r["replay_share"],
                "seconds": r["cost"]["seconds"],
            }
        )
    return out


def _stats(rows: list[dict], key: str) -> tuple[float, float, list[float]]:
    per_seed = {}
    for r in rows:
        per_seed.setdefault(r["seed"], []).append(r[key] or 0.0)
    means = [float(np.mean(v)) for v in per_seed.values()]
    return (
        float(np.mean([r[key] or 0.0 for r in rows])),
        float(np.median([r[key] or 0.0 for r in rows])),
        means,
    )


def report(res: dict, args) -> str:
    rows = res["rows"]
    body = []
    for name, rs in rows.items():
        aa, f, s = (_stats(rs, k) for k in ("AA", "F", "safety"))
        lf = _stats(rs, "loss_F")
        replay = np.mean(
            [np.mean([x for x in r["replay"][1:] if x is not None] or [0]) for r in rs]
        )
        body.append(
            [
                name,
                f"{100 * aa[0]:.1f}",
                f"{100 * f[0]:.1f}",
                f"{100 * s[0]:.1f}",
                f"{lf[0]:.3f}",
                f"{replay:.2f}",
                " / ".join(f"{100 * m:.1f}" for m in aa[2]),
                f"{np.median([r['seconds'] for r in rs]):.0f}",
            ]
        )
    base_names = [n for n, _ in BASELINES if n in rows] or ["ProxyMix"]
    fixed = [n for n in base_names if n.startswith("fixed")]
    best_fixed = max(fixed, key=lambda n: _stats(rows[n], "AA")[0]) if fixed else None
    strongest = max(base_names, key=lambda n: _stats(rows[n], "AA")[0])
    pm = rows.get("ProxyMix", [])

    def delta(other):
        return [100 * (_stats(pm, k)[0] - _stats(rows[other], k)[0]) for k in ("AA", "F", "safety")]

    def fmt(other):
        """The differences to ``other`` with their paired standard errors."""
        d, se = delta(other), [paired_se(pm, rows[other], k) for k in ("AA", "F", "safety")]
        return ", ".join(
            f"{k} {x:+.1f}" + ("" if e is None else f" (se {e:.1f})")
            for k, x, e in zip(("AA", "F", "safety"), d, se)
        )

    lines = [
        "# ProxyMix benchmark",
        "",
        f"Command: `python bench/proxymix.py {res['argv']}` "
        f"(threads {args.threads}). Machine: 2-core CPU, torch 2.13, shared with other jobs "
        f"(load at the end: {res['load']}). Total wall time {res['total_wall'] / 60:.1f} min, "
        + (
            "no controller learning (the shipped one)."
            if res["controller"] == "builtin"
            else f"of which controller learning {res['learn_wall'] / 60:.1f} min."
        ),
        "",
        f"Setting: `configs/proxymix.yaml`{' with the --quick overrides' if res['quick'] else ''}"
        f" (sequences {[' > '.join(o) for o in res['setting']['orders']]}; safety eval + "
        f"safety buffer; buffers of {res['setting']['buffer_size']}; "
        f"{res['setting']['steps']} steps per stage, batch {res['setting']['batch']}, "
        f"{res['setting']['decisions']} decisions per stage). Target: {res['setting']['target']}"
        f" ({res['setting']['target_params'] / 1e6:.2f}M params). Proxy: "
        f"{res['setting']['proxy']} ({res['setting']['proxy_params'] / 1e6:.2f}M params) after"
        f" a {res['setting']['warmup']}-step warm-up. "
        + (
            "Controller: the one shipped with mixtune (`mixer.controller: builtin`, see "
            "src/mixtune/mixers/proxymix/builtin/CARD.md)"
            if res["controller"] == "builtin"
            else f"One controller learned ({res['learner']} learner, seed 0, "
            f"{res['episodes']} episodes)"
        )
        + f", frozen; every method on the target with seeds {res['seeds']}.",
        "",
        "Accuracy = greedy exact match on 32 held-out examples per task; AA = mean final "
        "accuracy over the three tasks; F = mean (best - final) accuracy of the first two "
        "tasks; safety = final accuracy on 32 safety prompts (refuse harmful, help benign). "
        "Mean over sequences x seeds; per-seed AA means shown.",
        "",
        table(
            [
                "method",
                "AA",
                "F (lower better)",
                "safety",
                "loss forgetting",
                "replay share (stages 2-3)",
                "AA per seed",
                "s / sequence (median)",
            ],
            body,
        ),
        "",
    ]
    if pm and best_fixed:
        lines += [
            f"ProxyMix - best fixed replay ({best_fixed}, chosen on these results): "
            f"{fmt(best_fixed)} points.",
            f"ProxyMix - strongest baseline by AA ({strongest}): {fmt(strongest)} points. "
            "Paper (LLaMA-3-8B, abstract): +3.4 AA, -3.5 F, +5.8 safety vs the strongest "
            "non-oracle baseline. (se: the standard error of the mean of the paired "
            f"differences over the {len(pm)} sequence x seed runs; the evaluation sets are "
            "the same for every method.)",
            "",
        ]
    for rep in res["proxymix_reports"]:
        c, chk = rep.get("policy_cost", {}), rep.get("transfer_check", {})
        lines.append(
            f"- seed run: transfer check {chk.get('statistic')} = {chk.get('value')} over "
            f"{chk.get('items')} (threshold {chk.get('threshold')}) -> "
            f"{'controller used' if chk.get('passed') else 'fell back to fixed replay'}; "
            f"policy-learning cost ratio (RL on target / proxy): "
            f"{c.get('ratio_seconds', float('nan')):.1f}x by wall time, "
            f"{c.get('ratio_flops', float('nan')):.1f}x by training FLOPs "
            f"(paper: ~50x vs Oracle Target RL)."
        )
    if "untrained controller" in rows and pm:
        lines += ["", replay_comparison(pm, rows["untrained controller"])]
    if res["greedy"]:
        lines += ["", greedy_table(res["greedy"])]
    rets = [r["return"] for r in res["returns"]]
    if rets:
        k = max(1, len(rets) // 3)
        lines += [
            "",
            f"Learning curve on the proxy: mean return of the first {k} episodes "
            f"{np.mean(rets[:k]):+.3f}, last {k} {np.mean(rets[-k:]):+.3f} "
            f"(returns per episode: {[round(x, 3) for x in rets]}).",
        ]
    return "\n".join(lines) + "\n"


def paired_se(a: list[dict], b: list[dict], key: str) -> float | None:
    """Standard error (points) of the mean difference ``a - b`` over the runs both have,
    paired by seed and sequence (the same data and evaluation sets)."""
    other = {(r["seed"], tuple(r["order"])): r[key] for r in b}
    d = [
        100 * ((r[key] or 0.0) - (other[(r["seed"], tuple(r["order"]))] or 0.0))
        for r in a
        if (r["seed"], tuple(r["order"])) in other
    ]
    return float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None


def replay_comparison(pm: list[dict], untrained: list[dict]) -> str:
    """Replay shares per stage of the transferred controller vs the untrained ones."""

    def per_stage(rows):
        return np.array([[x or 0.0 for x in r["replay"]] for r in rows]).mean(0)

    a, b = per_stage(pm), per_stage(untrained)
    return (
        "Replay share per stage (mean over sequences x seeds): transferred controller "
        f"{[round(float(x), 3) for x in a]}, untrained controller (policy random, seeded by "
        f"the run seed) {[round(float(x), 3) for x in b]}; difference in stages 2-3 "
        f"{float(np.mean(a[1:]) - np.mean(b[1:])):+.3f}."
    )


def greedy_table(points: list[dict]) -> str:
    """The greedy policy's held-out learning curve on the proxy."""
    body = [
        [
            p["episodes"],
            f"{p['mean']:+.3f}",
            "-" if p.get("se") is None else f"{p['se']:.3f}",
            "-" if "gain" not in p else f"{p['gain']:+.3f}",
            "-" if p.get("gain_se") is None else f"{p['gain_se']:.3f}",
        ]
        for p in points
    ]
    last = points[-1]
    verdict = ""
    if last.get("gain_se"):
        z = last["gain"] / last["gain_se"]
        verdict = (
            f" Final gain over the untrained controller: {last['gain']:+.3f} = {z:+.1f} "
            f"standard errors ({'meets' if z > 2 else 'misses'} the issue's > 2 se)."
        )
    return (
        "Greedy policy (no exploration) on held-out proxy episodes (the same "
        f"{len(last['returns'])} episodes, unseen data seeds, at every point; gain = paired "
        "difference to the untrained controller, evaluation 0):"
        + verdict
        + "\n\n"
        + table(["training episodes", "return", "se", "gain", "gain se"], body)
    )


def ship(controller: Path, ldir: Path, cc, overrides: list[str], args) -> None:
    """Install ``controller`` as ``mixer.controller: builtin`` with its card."""
    write_card(controller, ldir, cc, "python bench/proxymix.py --ship", overrides)
    print(f"shipped {BUILTIN / 'controller.pt'} (card: {BUILTIN / 'CARD.md'})")


def write_card(controller: Path, ldir: Path, cc, command: str, overrides: list[str]) -> None:
    """Copy the controller into the package and write card.json / CARD.md next to it."""
    from mixtune.mixers.proxymix import controller as ctl
    from mixtune.mixers.proxymix.setting import proxy_setting

    BUILTIN.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(controller, BUILTIN / "controller.pt")
    _, info = ctl.load(BUILTIN / "controller.pt")
    pc = proxy_setting(cc)
    greedy = json.loads((ldir / "greedy.json").read_text())
    returns = [json.loads(ln) for ln in (ldir / "returns.jsonl").read_text().splitlines() if ln]
    card = {
        "command": command,
        "overrides": overrides,
        "config": "configs/proxymix.yaml",
        "proxy_model": pc.model.config,
        "proxy_warmup_steps": pc.warmup.steps,
        "proxy_steps_per_stage": pc.steps_per_stage,
        "sequences": cc.orders(),
        "learn": {k: getattr(cc.learn, k) for k in LEARN_KEYS},
        "vulnerability": info["vulnerability"],
        "cost": info["meta"].get("cost"),
        "greedy": greedy,
        "returns": returns,
    }
    (BUILTIN / "card.json").write_text(json.dumps(card, indent=1, default=str))
    shutil.copyfile(ldir / "greedy.png", BUILTIN / "greedy.png")
    last = greedy[-1]
    z = last["gain"] / last["gain_se"] if last.get("gain_se") else float("nan")
    lines = [
        "# The built-in ProxyMix controller (`mixer.controller: builtin`)",
        "",
        "Learned by `mixtune proxymix learn` on a proxy of the built-in continual sequences of "
        "`configs/proxymix.yaml` (tasks arithmetic, word_problems, trivia in three orders; "
        "safety eval and safety buffer; replay buffers of 100 examples), frozen, shipped.",
        "",
        f"- Reproduce: `{command}` (overrides of configs/proxymix.yaml: "
        f"`{' '.join(overrides)}`); 2-core CPU, about "
        f"{_minutes(info['meta']['cost']):.0f}"
        " min after the proxy's warm-up (cached; about 7 min once).",
        f"- Proxy: llama {pc.model.config} from scratch, {pc.warmup.steps}-step warm-up, "
        f"{pc.steps_per_stage} steps per stage, losses only; "
        f"{info['meta'].get('proxy_params', 0) / 1e6:.2f}M parameters.",
        f"- Learner: {cc.learn.episodes} episodes, {cc.learn.episodes_per_update} per update "
        f"(antithetic {cc.learn.antithetic}, baseline {cc.learn.baseline}, lr {cc.learn.lr}, "
        f"sigma {cc.learn.sigma}, algorithm {cc.learn.algorithm}); returns per episode in "
        "card.json.",
        f"- Reward: per decision, current-task gain - {cc.learn.lambda_forget} x buffer loss "
        f"increases - {cc.learn.lambda_safety} x safety loss increase (ratio units); at the "
        f"end, {cc.learn.terminal_weight} x terminal bonus (terminal_metric "
        f"{cc.learn.terminal_metric}, lambda_F {cc.learn.lambda_F}, lambda_S "
        f"{cc.learn.lambda_S}; see docs/proxymix.md).",
        f"- Proxy vulnerability ranking (for the pre-transfer check): {info['ranking']}.",
        "",
        f"Greedy held-out curve ({len(last['returns'])} episodes on unseen data, paired with "
        f"the untrained controller, i.e. the learner's seed-{cc.seed} initialisation): "
        f"final gain {last['gain']:+.3f} ({z:+.1f} se) -- "
        f"{'meets' if z > 2 else 'MISSES'} the issue's > 2 se. See greedy.png.",
        "",
        greedy_table(greedy),
        "",
        "Transfer check and target numbers: BENCHMARKS.md (ProxyMix) and "
        "bench/results/proxymix_builtin.md (`python bench/proxymix.py --controller builtin ...`)."
        " A reward that values learning the new task more (`--learner learned_reward`, issue 21)"
        " was learned and measured too, and not shipped: "
        "bench/results/proxymix_builtin_loss_learned.md.",
    ]
    (BUILTIN / "CARD.md").write_text("\n".join(lines) + "\n")


def _minutes(cost: dict) -> float:
    return (cost["seconds"] + cost.get("eval_seconds", 0.0)) / 60


LEARN_KEYS = (
    "episodes",
    "episodes_per_update",
    "antithetic",
    "baseline",
    "vary_data_seed",
    "lr",
    "sigma",
    "gamma",
    "algorithm",
    "terminal_metric",
    "terminal_weight",
    "lambda_forget",
    "lambda_safety",
    "lambda_F",
    "lambda_S",
    "eval_every",
    "eval_episodes",
)


if __name__ == "__main__":
    main()
