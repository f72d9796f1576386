"""MergeMix: data-mixture ratios from merged domain experts (``mixtune plan mergemix PLAN.yaml``).

Wang, Tian, Chen, Liu, Mao, Zhao, Zhang, Zhou, "MergeMix: Optimizing Mid-Training Data Mixtures
via Learnable Model Merging", arXiv 2601.17858 (2026). Notes: docs/mergemix.md.

The method in plain text:

1. From one base θ_0, train an expert θ_k on each training dataset k alone, briefly and with a
   constant LR; τ_k = θ_k − θ_0 (for LoRA experts, the adapter's dense delta).
2. For a merge weight α on the simplex, θ(α) = θ_0 + Σ_k α_k τ_k approximates the model trained
   on the mixture α (equal to first order in the training horizon). Evaluate N seed α's
   (vertices, centroid, Dirichlet(1) samples) on the evaluation domains.
3. Fit one surrogate per evaluation domain, α -> metric; pick α* optimising the weighted
   objective over a dense simplex sample, subject to per-domain bounds; optionally evaluate the
   top-k, refit, repeat.
4. Map α* to data ratios and write a ready-to-run ``mixtune train`` YAML (a ``fixed`` mixer).

Where the paper note marks a detail PROPOSAL, it is an option here (defaults in brackets):

1. Objective [mean loss of the ``target`` evaluation domains, or of all domains when none is a
   target]: per-domain weights, ``metric: accuracy`` and ``normalize: base`` (each domain as a
   ratio to the base model) are options. The paper optimises downstream benchmark accuracy; at
   tiny scale, losses are the less noisy signal.
2. Surrogate [``gbt``: a numpy gradient-boosted tree ensemble with LightGBM's growth rule and
   the note's settings]; ``lightgbm`` (if installed), ``gp`` and ``quadratic`` are alternatives.
3. Constraints [every ``constraint``-role domain keeps its metric at its reference, null = the
   base model's merged-eval value] plus explicit ``constraints: {domain: {max|min: v}}`` — the
   DynaMiCS-style floors/ceilings — checked on the surrogate predictions.
4. Ratio rule [``identity``: r = α]; ``token_weighted``: r_k ∝ α_k T_k (T_k = tokens expert k
   trained on). ``ratio_units`` [``examples``] says whether r are example shares (mixtune's
   weights) or token shares (converted with each dataset's mean supervised tokens per example).
5. Budgets [expert: ``run.max_steps // 4`` steps, or ``experts.tokens``]; seeds [max(20, 5K)];
   candidates [1e5]; refit rounds [0]; α* [the surrogate's optimum; ``search.select: measured``
   takes the best merge actually evaluated instead].

Deliberate simplifications: (1) a tree surrogate's optimum is a flat region, α* is the mean of
its tied candidates (planners/search.py); (2) merged models are scored with mixtune's own
per-domain evaluation (fixed batches), not downstream benchmark suites; (3) the planner runs in
one process.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import yaml

from mixtune import config as config_mod
from mixtune.config import RunConfig
from mixtune.errors import ConfigError
from mixtune.planners.mergemix import experts, search
from mixtune.planners.mergemix.config import (  # noqa: F401  (re-exported: the plan's API)
    ExpertsConfig,
    ObjectiveConfig,
    PlanConfig,
    SearchConfig,
    ValidateConfig,
    bound_specs,
    bounds_of,
    load,
    objective_of,
)
from mixtune.planners.mergemix.surrogate import lattice

log = logging.getLogger(__name__)


def ratio_scale(pc: PlanConfig, infos, summaries) -> np.ndarray:
    """c with ratios r ∝ α ⊙ c (so the inverse map is α ∝ r / c)."""
    c = np.ones(len(infos))
    if pc.ratio_rule == "token_weighted":
        c = c * np.array([max(s["tokens"], 1) for s in summaries], np.float64)
    if pc.ratio_units == "tokens":
        c = c / np.array([i.tokens / max(i.size, 1) for i in infos], np.float64)
    return c


def to_ratios(alpha, c) -> np.ndarray:
    r = np.asarray(alpha, np.float64) * c
    return r / r.sum()


def from_ratios(w, c) -> np.ndarray:
    a = np.asarray(w, np.float64) / c
    return a / a.sum()


def mixture_config(run: RunConfig, weights: dict, **top) -> dict:
    raw = config_mod.to_dict(run)
    raw["mixer"] = {"name": "fixed", "weights": {k: round(float(v), 6) for k, v in weights.items()}}
    raw.update(top)
    return raw


# ---------------------------------------------------------------------------------------------


class Planner:
    """Experts, task vectors and the merged-model evaluator of one plan (resumable)."""

    def __init__(self, pc: PlanConfig, run: RunConfig):
        from mixtune.engine.loop import Trainer

        self.pc, self.run = pc, run
        self.out = Path(pc.output_dir)
        self.objective = objective_of(pc, run)
        self.accuracy = pc.objective.metric == "accuracy" or any(
            m == "accuracy" for _, m, _ in bound_specs(pc, run)
        )
        # One plain (non-LoRA) copy of the base model scores every merge.
        raw = config_mod.to_dict(run)
        raw["model"]["lora"]["enabled"] = False
        raw.update(
            output_dir=str(self.out / "_eval"),
            progress=False,
            report_to=[],
            evals=experts.eval_raw(run, self.accuracy),
        )
        self.trainer = Trainer(config_mod.from_dict(raw))
        module = self.trainer.acc.unwrap_model(self.trainer.model)
        self.base = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.infos = self.trainer.infos
        self.names = [i.name for i in self.infos]
        e = pc.experts
        self.steps = [experts.expert_steps(run, i, e.steps, e.tokens) for i in self.infos]
        self.expert_cfgs = [
            experts.expert_config(
                run,
                k,
                s,
                e.lr or run.train.lr,
                self.out,
                e.save_every or max(1, s // 4),
                pc.progress,
            )
            for k, s in enumerate(self.steps)
        ]
        for cfg in self.expert_cfgs:
            _check_same(cfg)
        self.ready = False

    def prepare(self) -> None:
        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "plan.yaml").write_text(
            yaml.safe_dump(config_mod.to_dict(self.pc), sort_keys=False)
        )
        self.summaries = experts.train_experts(self.expert_cfgs, self.pc.progress)
        self.tv_paths = [self.out / "task_vectors" / f"{n}.safetensors" for n in self.names]
        for cfg, path in zip(self.expert_cfgs, self.tv_paths):
            experts.build_task_vector(
                Path(cfg.output_dir), self.base, path, self.run.model.lora.enabled
            )
        self.evaluator = experts.MergedEvaluator(
            self.trainer,
            self.base,
            self.tv_paths,
            self.out / "evals.jsonl",
            self.pc.search.eval_batches,
            self.accuracy,
        )
        self.base_scores = self.evaluator.base_scores()
        self.objective = objective_of(self.pc, self.run, self.base_scores)
        self.bounds = bounds_of(self.pc, self.run, self.base_scores)
        self.c = ratio_scale(self.pc, self.infos, self.summaries)
        self.prepare_seconds = time.perf_counter() - t0
        self.ready = True

    def value(self, scores: dict) -> float:
        return float(
            self.objective.value(
                {(d, m): np.array([scores[d][m]]) for d, m in search.quantities(self.objective, [])}
            )[0]
        )


def _check_same(cfg: RunConfig) -> None:
    saved = Path(cfg.output_dir) / "config.yaml"
    if not saved.is_file():
        return
    old = yaml.safe_load(saved.read_text()) or {}
    new = config_mod.to_dict(cfg)
    for d in (old, new):
        d.pop("progress", None)
    if json.dumps(old, sort_keys=True, default=str) != json.dumps(new, sort_keys=True, default=str):
        raise ConfigError(
            f"{cfg.output_dir} holds an expert trained with other settings; use a "
            "new output_dir for this plan (or delete that expert)"
        )


def plan(pc: PlanConfig, run: RunConfig, planner: Planner | None = None) -> dict:
    """Run (or resume) the whole plan; returns the result written to ``plan.json``."""
    from mixtune.planners.mergemix import report as mergemix_report

    t0 = time.perf_counter()
    p = planner or Planner(pc, run)
    if not p.ready:
        p.prepare()
    K, s = len(p.names), pc.search
    res = search.run(
        p.evaluator,
        K,
        objective=p.objective,
        bounds=p.bounds,
        surrogate=s.surrogate,
        n_seeds=s.n_seeds or max(20, 5 * K),
        n_candidates=s.n_candidates,
        refit_rounds=s.refit_rounds,
        top_k=s.top_k,
        seed=run.seed if s.seed is None else s.seed,
        progress=pc.progress,
    )
    measured = p.evaluator(res.alpha, "alpha*")
    p.evaluator.restore()
    chosen = "surrogate"
    if s.select == "measured":
        best = _best_measured(
            p, [(res.alpha, measured)] + [(np.asarray(t["alpha"]), t["scores"]) for t in res.table]
        )
        if best is not None and best[0] is not res.alpha:
            res.alpha, measured, chosen = best[0], best[1], "measured"
    weights = dict(zip(p.names, to_ratios(res.alpha, p.c).tolist()))
    mix_path = p.out / "mixture.yaml"
    header = (
        f"# Written by `mixtune plan mergemix` ({p.out}): alpha* = "
        f"{ {n: round(a, 4) for n, a in zip(p.names, res.alpha.tolist())} }, "
        f"ratio_rule={pc.ratio_rule}, ratio_units={pc.ratio_units}.\n"
        f"# Train with: mixtune train {mix_path}\n"
    )
    mix_path.write_text(header + yaml.safe_dump(mixture_config(run, weights), sort_keys=False))
    result = {
        "datasets": p.names,
        "alpha": res.alpha.tolist(),
        "weights": weights,
        "ratio_rule": pc.ratio_rule,
        "ratio_units": pc.ratio_units,
        "selected_by": chosen,
        "objective": {
            "metric": p.objective.metric,
            "weights": p.objective.weights,
            "normalize": pc.objective.normalize,
        },
        "bounds": [vars(b) for b in p.bounds],
        "feasible": res.feasible,
        "predicted": res.predicted,
        "predicted_objective": res.predicted_objective,
        "measured": measured,
        "measured_objective": p.value(measured),
        "base": p.base_scores,
        "base_objective": p.value(p.base_scores),
        "table": [{**r, "objective": p.value(r["scores"])} for r in res.table],
        "fits": res.fits,
        "rounds": res.rounds,
        "surrogate": s.surrogate,
        "experts": [
            {
                "name": n,
                "steps": st,
                "tokens": sm["tokens"],
                "seconds": sm["seconds"],
                "final_eval": sm.get("final_eval"),
            }
            for n, st, sm in zip(p.names, p.steps, p.summaries)
        ],
        "cost": cost(pc, run, p, time.perf_counter() - t0),
        "mixture_yaml": str(mix_path),
    }
    (p.out / "plan.json").write_text(json.dumps(result, indent=1))
    mergemix_report.write(p.out, result)
    return result


def _best_measured(p: Planner, points: list) -> tuple | None:
    """The best measured point within the bounds (None when none is)."""
    best = None
    for alpha, scores in points:
        if any(b.violation(np.array([scores[b.domain][b.metric]]))[0] > 0 for b in p.bounds):
            continue
        u = p.value(scores) * (1 if p.objective.metric == "loss" else -1)
        if best is None or u < best[0]:
            best = (u, alpha, scores)
    return None if best is None else best[1:]


def cost(pc: PlanConfig, run: RunConfig, p: Planner, wall: float) -> dict:
    """Search cost against the grid of full mixture runs it replaces (paper note §1.7)."""
    K = len(p.names)
    tpe = np.array([i.tokens / max(i.size, 1) for i in p.infos])
    search_tokens = int(sum(s["tokens"] for s in p.summaries))
    expert_seconds = float(sum(s["seconds"] for s in p.summaries))
    per_step = expert_seconds / max(sum(p.steps), 1)
    per_eval = p.evaluator.seconds / max(p.evaluator.n_evals, 1)
    n_evals = p.evaluator.n_evals
    R = len(lattice(K, pc.grid_resolution))
    full_tokens = run.max_steps * run.train.batch_size * float(tpe.mean())
    return {
        "search_tokens": search_tokens,
        "expert_steps": int(sum(p.steps)),
        "expert_seconds": round(expert_seconds, 2),
        "n_evals": n_evals,
        "eval_seconds": round(p.evaluator.seconds, 2),
        "search_seconds": round(expert_seconds + p.evaluator.seconds, 2),
        "wall_seconds_this_call": round(wall, 2),
        "grid_runs": R,
        "grid_resolution": pc.grid_resolution,
        "grid_tokens": int(R * full_tokens),
        "grid_evals": R,
        "grid_seconds_est": round(R * (run.max_steps * per_step + per_eval), 1),
        "token_ratio": R * full_tokens / max(search_tokens, 1),
        "seconds_ratio_est": R
        * (run.max_steps * per_step + per_eval)
        / max(expert_seconds + p.evaluator.seconds, 1e-9),
    }
