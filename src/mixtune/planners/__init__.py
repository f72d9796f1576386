"""Planners: offline searches that emit a mixture (a ready-to-run ``mixtune train`` YAML).

``mixtune plan <method> PLAN.yaml [key=value ...] [--validate]`` calls :func:`run_plan`. Each
planner is a package here and one line in :data:`mixtune.registry.PLANNERS`. Its entry point
(a class of static methods) has:

- ``run(path, overrides, validate) -> dict``: run (or resume) the plan in the plan file; the
  result holds at least ``datasets``, ``alpha`` and ``mixture_yaml`` (what ``mixtune plan``
  prints);
- ``output_dir(path, overrides) -> str``: the plan's directory (for error logs);
- ``suite_plan(options, run, output_dir, reference_slack) -> dict``: the plan config a suite's
  planner method runs (``mixtune bench``): ``options`` are the method's ``planner:`` keys but
  ``name``, ``run`` the raw run config of the cell (without the suite's constraint references
  and test domains), ``reference_slack`` the suite's stated slack (nats) or None;
- ``check(plan) -> None``: validate such a plan config, raising ConfigError, running nothing;
- ``mixer(output_dir) -> dict``: the ``mixer`` section that trains on the finished plan.
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
