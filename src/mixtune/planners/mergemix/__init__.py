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
   top-k, refit, repeat. (By default here the surrogate only proposes and α* is the best
   *measured* merge: option 5 below.)
4. Map α* to data ratios and write a ready-to-run ``mixtune train`` YAML (a ``fixed`` mixer).

Where the paper note marks a detail PROPOSAL, it is an option here (defaults in brackets):

1. Objective [mean loss of the ``target`` evaluation domains, or of all domains when none is a
   target, each as a z-score over the seed merges (``normalize: spread``), so each domain's
   share of the objective is its weight]: per-domain weights, ``metric: accuracy``,
   ``normalize: base`` (each domain as a ratio to the base model; lets a domain with a small
   base value dominate) and ``none`` are options. The paper optimises downstream benchmark
   accuracy; at tiny scale, losses are the less noisy signal.
2. Surrogate [``gbt``: a numpy gradient-boosted tree ensemble with LightGBM's growth rule and
   the note's settings]; ``lightgbm`` (if installed), ``gp`` and ``quadratic`` are alternatives.
3. Constraints [every ``constraint``-role domain keeps its metric at its reference, null = the
   base model's merged-eval value] plus explicit ``constraints: {domain: {max|min: v}}`` — the
   DynaMiCS-style floors/ceilings — checked on the surrogate predictions.
4. Ratio rule [``identity``: r = α]; ``token_weighted``: r_k ∝ α_k T_k (T_k = tokens expert k
   trained on). ``ratio_units`` [``examples``] says whether r are example shares (mixtune's
   weights) or token shares (converted with each dataset's mean supervised tokens per example).
5. Budgets [expert: ``run.max_steps // 4`` steps, or ``experts.tokens``]; seeds [max(20, 5K)];
   candidates [1e5]; refit rounds [0]; α* [``search.select: measured``: the best merge actually
   evaluated, the surrogate proposing only inside a trust region around measured merges, its
   proposal measured too, so α* is never an unmeasured extrapolation;
   ``search.select: surrogate`` is the paper's rule, the surrogate's optimum, kept faithful].

Deliberate simplifications: (1) a tree surrogate's optimum is a flat region, α* is the mean of
its tied candidates (:mod:`~mixtune.planners.mergemix.search`); (2) merged models are scored
with mixtune's own per-domain evaluation (fixed batches), not downstream benchmark suites;
(3) the planner runs in one process.

The modules:

- :mod:`~mixtune.planners.mergemix.config`: the plan YAML's dataclasses, objective and bounds;
- :mod:`~mixtune.planners.mergemix.experts`: domain experts, their task vectors, merged evals;
- :mod:`~mixtune.planners.mergemix.merge`: weight-space merging (linear, task arithmetic, LoRA);
- :mod:`~mixtune.planners.mergemix.surrogate` / :mod:`~mixtune.planners.mergemix.search`: the
  surrogates over the simplex and the search over merge weights;
- :mod:`~mixtune.planners.mergemix.mixture`: merge weights to data ratios, and the mixture's
  run config;
- :mod:`~mixtune.planners.mergemix.planner`: the plan itself; :mod:`~.report`: its report;
  :mod:`~mixtune.planners.mergemix.validate`: does the merged proxy rank mixtures like training?
"""

from __future__ import annotations

import json
from pathlib import Path


class MergeMix:
    """The planner entry point the registry names (``PLANNERS["mergemix"]``).

    Its hooks (see :mod:`mixtune.planners`): ``run`` and ``output_dir`` for ``mixtune plan``;
    ``suite_plan``, ``check`` and ``mixer`` for a suite's planner methods (``mixtune bench``).
    """

    @staticmethod
    def run(path: str | Path | None, overrides=(), validate: bool = False) -> dict:
        """Run (or resume) the plan; with ``validate`` also train the validation mixtures and
        compare rankings. Returns the plan result (+ ``validation``)."""
        from mixtune.planners.mergemix import config, planner
        from mixtune.planners.mergemix.validate import validate_plan

        pc, run = config.load(path, overrides)
        p = planner.Planner(pc, run)
        result = planner.plan(pc, run, p)
        if validate:
            result["validation"] = validate_plan(pc, run, result, p)
        return result

    @staticmethod
    def output_dir(path: str | Path, overrides=()) -> str:
        """The plan's output directory."""
        from mixtune.planners.mergemix import config

        return config.load(path, overrides)[0].output_dir

    @staticmethod
    def suite_plan(
        options: dict, run: dict, output_dir: str, reference_slack: float | None = None
    ) -> dict:
        """The plan config planning the raw run config ``run`` with ``options`` (the plan's
        keys but ``run``), into ``output_dir``, without progress bars.

        ``reference_slack`` (nats) becomes the plan's own ``reference_slack`` unless the
        options set one: each constraint without a reference is bounded by the base model's
        loss as the planner measures it, on its own ``search.eval_batches``, plus the slack.
        """
        plan = json.loads(json.dumps(options))
        if reference_slack is not None:
            plan.setdefault("reference_slack", reference_slack)
        return {**plan, "run": run, "output_dir": output_dir, "progress": False}

    @staticmethod
    def check(plan: dict) -> None:
        """Validate a plan config (ConfigError naming the field), running nothing."""
        from mixtune.planners.mergemix import config

        config.load(None, data=plan)

    @staticmethod
    def mixer(output_dir: str | Path) -> dict:
        """The mixer section that trains on the finished plan in ``output_dir``: a ``fixed``
        mixer with the planned ratios (``plan.json``'s ``weights``)."""
        weights = json.loads((Path(output_dir) / "plan.json").read_text())["weights"]
        return {"name": "fixed", "weights": weights}
