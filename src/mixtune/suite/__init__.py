"""Suites (``mixtune bench SUITE.yaml``): methods side by side on the same scenarios.

- :mod:`~mixtune.suite.config`: the suite file (scenarios, methods, seeds, protocol);
- :mod:`~mixtune.suite.sweep`: the fixed-weight baselines (``sweep:``);
- :mod:`~mixtune.suite.cell`: the cells, and the run config (and plan config) of each;
- :mod:`~mixtune.suite.references`: base-model references under ``reference_slack``;
- :mod:`~mixtune.suite.runner`: running the cells (in processes), planning first;
- :mod:`~mixtune.suite.table`: the table (selection, feasibility, rows);
- :mod:`~mixtune.suite.results`: the table as Markdown, CSV, JSON and HTML;
- ``quick.yaml``, ``standard.yaml``, ``extended.yaml``: the built-in suites.

Nothing here branches on a method: a planner method reaches its planner through
:data:`mixtune.registry.PLANNERS` (its ``suite_plan``, ``check`` and ``mixer``), and a method's
own checks of its options run when a cell's config loads.
"""
