"""Planners: offline searches that emit a mixture (a ready-to-run ``mixtune train`` YAML).

``mixtune plan <method> PLAN.yaml [key=value ...] [--validate]`` calls :func:`run_plan`.
"""

from __future__ import annotations

from pathlib import Path

from mixtune.errors import ConfigError

PLANNERS = ("mergemix",)


def run_plan(method: str, path: str | Path, overrides=(), validate: bool = False) -> dict:
    """Run (or resume) planner ``method`` on the plan file; with ``validate`` also train the
    validation mixtures and compare rankings. Returns the plan result (+ ``validation``)."""
    if method != "mergemix":
        raise ConfigError(f"plan: unknown method '{method}'; available: {list(PLANNERS)}")
    from mixtune.planners import mergemix, mergemix_validate

    pc, run = mergemix.load(path, overrides)
    planner = mergemix.Planner(pc, run)
    result = mergemix.plan(pc, run, planner)
    if validate:
        result["validation"] = mergemix_validate.validate(pc, run, result, planner)
    return result


def output_dir(path: str | Path, overrides=()) -> str | None:
    """The plan's output directory (for error logs), or None when the file cannot be read."""
    try:
        from mixtune.planners import mergemix

        return mergemix.load(path, overrides)[0].output_dir
    except Exception:
        return None
