"""MergeMix (``mixtune plan mergemix PLAN.yaml``): data-mixture ratios from merged domain experts.

- :mod:`~mixtune.planners.mergemix.config`: the plan YAML's dataclasses, objective and bounds;
- :mod:`~mixtune.planners.mergemix.experts`: domain experts, their task vectors, merged evals;
- :mod:`~mixtune.planners.mergemix.merge`: weight-space merging (linear, task arithmetic, LoRA);
- :mod:`~mixtune.planners.mergemix.surrogate` / :mod:`~mixtune.planners.mergemix.search`: the
  surrogates over the simplex and the search over merge weights;
- :mod:`~mixtune.planners.mergemix.planner`: the plan itself; :mod:`~.report`: its report;
  :mod:`~mixtune.planners.mergemix.validate`: does the merged proxy rank mixtures like training?
"""

from __future__ import annotations

from pathlib import Path


class MergeMix:
    """The planner entry point the registry names (``PLANNERS["mergemix"]``)."""

    @staticmethod
    def run(path: str | Path | None, overrides=(), validate: bool = False) -> dict:
        """Run (or resume) the plan; with ``validate`` also train the validation mixtures and
        compare rankings. Returns the plan result (+ ``validation``)."""
        from mixtune.planners.mergemix import planner
        from mixtune.planners.mergemix import validate as check

        pc, run = planner.load(path, overrides)
        p = planner.Planner(pc, run)
        result = planner.plan(pc, run, p)
        if validate:
            result["validation"] = check.validate(pc, run, result, p)
        return result

    @staticmethod
    def output_dir(path: str | Path, overrides=()) -> str:
        from mixtune.planners.mergemix import planner

        return planner.load(path, overrides)[0].output_dir
