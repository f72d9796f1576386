"""Suites (``mixtune bench SUITE.yaml``): methods side by side on the same scenarios.

- :mod:`~mixtune.suite.runner`: the suite file, its cells, running them (in processes);
- :mod:`~mixtune.suite.cell`: one cell's run config, plan (planner methods) and process;
- :mod:`~mixtune.suite.sweep`: the fixed-weight baselines (``sweep:``);
- :mod:`~mixtune.suite.table`: the table (selection, feasibility, Markdown/CSV/JSON/HTML);
- ``quick.yaml``, ``standard.yaml``, ``extended.yaml``: the built-in suites.
"""
