"""Planners: offline searches that emit a mixture (a ready-to-run ``mixtune train`` YAML).

``mixtune plan <method> PLAN.yaml [key=value ...] [--validate]`` calls :func:`run_plan`. Each
planner is a package here and one line in :data:`mixtune.registry.PLANNERS`; its entry point has
``run(path, overrides, validate)`` and ``output_dir(path, overrides)``.
"""

from __future__ import annotations

from pathlib import Path

from mixtune.registry import PLANNERS


def run_plan(method: str, path: str | Path, overrides=(), validate: bool = False) -> dict:
    """Run (or resume) planner ``method`` on the plan file (see the planner's ``run``)."""
    return PLANNERS.get_class(method, "plan").run(path, overrides, validate)


def output_dir(method: str, path: str | Path, overrides=()) -> str | None:
    """The plan's output directory (for error logs), or None when the file cannot be read."""
    try:
        return PLANNERS.get_class(method, "plan").output_dir(path, overrides)
    except Exception:
        return None
