"""The MergeMix plan: experts -> task vectors -> merged evaluations -> search -> a mixture.

:class:`Planner` holds one plan's experts, task vectors and merged-model evaluator (resumable:
finished experts and cached merges are reused); :func:`plan` runs the search and writes
``mixture.yaml``, ``plan.json`` and the report; :func:`cost` compares its cost with the grid of
full runs it replaces. The method, its options and deviations: :mod:`mixtune.planners.mergemix`.
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
from mixtune.engine.fingerprint import AMENDABLE
from mixtune.errors import ConfigError
from mixtune.planners.mergemix import experts, search
from mixtune.planners.mergemix.config import PlanConfig, bound_specs, bounds_of, objective_of
from mixtune.planners.mergemix.mixture import mixture_config, ratio_scale, to_ratios
from mixtune.planners.mergemix.surrogate import lattice

log = logging.getLogger(__name__)


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
        self.trainer = Trainer(config_mod.from_dict(raw), writer=False)  # scores merges only
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
    # What a resume may change (the run contract's amendable keys: logging, packing -- recorded
    # resolved, auto -> true/false --, micro-batching, the logits path) does not make another
    # expert: the same update up to rounding.
    for d in (old, new):
        for key in AMENDABLE:
            _drop(d, key)
    if json.dumps(old, sort_keys=True, default=str) != json.dumps(new, sort_keys=True, default=str):
        raise ConfigError(
            f"{cfg.output_dir} holds an expert trained with other settings; use a "
            "new output_dir for this plan (or delete that expert)"
        )


def _drop(d: dict, dotted: str) -> None:
    """Remove the dotted key ``dotted`` from the nested dict ``d`` where present."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.get(p)
        if not isinstance(d, dict):
            return
    d.pop(leaf, None)


def plan(pc: PlanConfig, run: RunConfig, planner: Planner | None = None) -> dict:
    """Run (or resume) the whole plan; returns the result written to ``plan.json``."""
    from mixtune.planners.mergemix import report

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
        select=s.select,
        trust_radius=s.trust_radius,
    )
    p.objective = res.objective  # spread normalisation resolved on the seed merges
    measured = p.evaluator(res.alpha, "alpha*")  # cached when alpha* is a measured merge
    proposal = p.evaluator(res.proposal, "proposal")
    p.evaluator.restore()
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
        "selected_by": res.selected,
        "trust_radius": res.trust_radius,
        "proposal": {
            "alpha": res.proposal.tolist(),
            "measured": proposal,
            "measured_objective": p.value(proposal),
        },
        "objective": {
            "metric": p.objective.metric,
            "weights": p.objective.weights,
            "center": p.objective.center,
            "normalize": pc.objective.normalize,
            "shares": search.shares(p.objective, res.table),
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
    report.write(p.out, result)
    return result


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
