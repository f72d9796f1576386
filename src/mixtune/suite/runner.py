"""``mixtune bench SUITE.yaml``: run a suite's cells, each in its own process, then the table.

Every cell is an ordinary ``mixtune train`` run under ``<output_dir>/cells/<key>/``; a cell
with ``summary.json`` is finished and never rerun, so an interrupted suite resumes. A cell that
fails records its error (``error.txt``) and the rest finish. Cells run in parallel processes
(``parallel``), each with ``threads`` torch threads.

A planner method's cell plans first: ``mixtune plan <planner>`` in a subprocess (plan directory
``<output_dir>/plans/<cell key>``), then ``mixtune train`` with the mixer the plan emits. A
finished plan -- ``mixer.json`` (the planned mixer) plus ``seconds.txt`` -- is reused on resume;
an interrupted one is run again, and resumes its own work (MergeMix: its experts and cached
merges). ``wall.txt`` = planning + training wall time; ``plan_seconds.txt`` = the planning part.
A cell interrupted and resumed counts the training time the checkpoint it resumed from had
kept (``summary.json``'s ``resumed_seconds``) plus the resumed process's wall time: its cost is
the work kept, not only the last attempt (start-ups of lost attempts and work after their last
checkpoint are not counted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from mixtune.errors import ConfigError
from mixtune.registry import PLANNERS
from mixtune.suite.cell import Cell, cell_raw, cells, plan_config, scenario_evals
from mixtune.suite.config import Suite
from mixtune.suite.references import references
from mixtune.suite.results import write_tables
from mixtune.suite.table import aggregate


def run_suite(suite: Suite, progress: bool = True) -> list[dict]:
    """Run every unfinished cell, then write the tables; returns the aggregated rows."""
    root = Path(suite.output_dir)
    (root / "cells").mkdir(parents=True, exist_ok=True)
    runs = [c for c in cells(suite) if c.alias_of is None]
    todo = [c for c in runs if not (root / "cells" / c.key / "summary.json").is_file()]
    total = len(runs)
    print(
        f"suite: {total} cells, {total - len(todo)} already done, running {len(todo)} "
        f"({suite.parallel} at a time, {suite.threads} threads each)",
        flush=True,
    )
    refs = references(suite, {(c.scenario.name, c.seed): c for c in todo}.values())
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not progress)

    def one(cell: Cell) -> None:
        run_cell(suite, cell, root / "cells" / cell.key, refs)
        bar.update(1)

    with ThreadPoolExecutor(max_workers=suite.parallel) as pool:
        list(pool.map(one, todo))
    bar.close()
    rows = aggregate(suite, cells(suite))
    write_tables(suite, rows)
    return rows


def check_suite(suite: Suite) -> int:
    """Validate every cell's run config (and plan config) without running anything.

    Constraint references (``reference_slack``) are filled with a placeholder. Loading a run
    config runs its methods' own checks (e.g. a ``fixed`` mixer's dataset names, sweep members
    included). Returns the number of cells that would run (sweep members with coinciding
    weights count once).
    """
    from mixtune import config

    runs = [c for c in cells(suite) if c.alias_of is None]
    fake = {
        s.name: {seed: {e["name"]: 0.0 for e in scenario_evals(suite, s)} for seed in suite.seeds}
        for s in suite.scenarios
    }
    for c in runs:
        try:
            out = Path(suite.output_dir) / "cells" / c.key
            raw = cell_raw(suite, c, out, fake if suite.reference_slack is not None else None)
            config.load(data=raw, overrides=c.scenario.overrides)
            if c.method.planner is not None:
                planner = PLANNERS[c.method.planner["name"]]
                planner.check(plan_config(suite, c, raw, Path("plan")))
        except ConfigError as e:
            raise ConfigError(f"cell {c.key}: {e}") from None
    return len(runs)


def run_cell(suite: Suite, cell: Cell, out: Path, refs: dict | None) -> None:
    """Run one cell (plan first for a planner method); never raises for a failing cell."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        raw = cell_raw(suite, cell, out, refs)
    except ConfigError as e:
        (out / "error.txt").write_text(f"config: {e}\n")
        return
    plan_seconds = 0.0
    if cell.method.planner is not None:
        planned = _plan(suite, cell, raw, out)
        if planned is None:
            return
        raw["mixer"], plan_seconds = planned
        (out / "plan_seconds.txt").write_text(f"{plan_seconds:.3f}\n")
    (out / "cell.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    ok, wall = _run(["train", str(out / "cell.yaml"), *cell.scenario.overrides], suite, out, "")
    if ok:
        (out / "error.txt").unlink(missing_ok=True)
        kept = json.loads((out / "summary.json").read_text()).get("resumed_seconds", 0.0)
        (out / "wall.txt").write_text(f"{plan_seconds + kept + wall:.3f}\n")


def _plan(suite: Suite, cell: Cell, raw: dict, out: Path) -> tuple[dict, float] | None:
    """Plan (or reuse the finished plan of) a planner cell: (its mixer, planning seconds)."""
    name = cell.method.planner["name"]
    plan_dir = Path(suite.output_dir) / "plans" / cell.key
    mixer, seconds = plan_dir / "mixer.json", plan_dir / "seconds.txt"
    if not (mixer.is_file() and seconds.is_file()):
        plan_dir.mkdir(parents=True, exist_ok=True)
        spent = float(seconds.read_text()) if seconds.is_file() else 0.0
        plan = plan_config(suite, cell, raw, plan_dir)
        (plan_dir / "suite_plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
        ok, wall = _run(["plan", name, str(plan_dir / "suite_plan.yaml")], suite, out, "plan_")
        # Time of every attempt counts (an interrupted plan resumes, its work is not redone).
        seconds.write_text(f"{spent + wall:.3f}\n")
        if not ok:
            return None
        mixer.write_text(json.dumps(PLANNERS[name].mixer(plan_dir)))
    return json.loads(mixer.read_text()), float(seconds.read_text())


def _env(suite: Suite) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(suite.threads),
        "MKL_NUM_THREADS": str(suite.threads),
        "TOKENIZERS_PARALLELISM": "false",
    }


def _run(args: list[str], suite: Suite, out: Path, tag: str) -> tuple[bool, float]:
    """Run ``python -m mixtune ARGS``; logs to out/<tag>.{stdout,stderr}.txt, error.txt."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mixtune", *args], env=_env(suite), capture_output=True, text=True
    )
    (out / f"{tag}stdout.txt").write_text(proc.stdout)
    (out / f"{tag}stderr.txt").write_text(proc.stderr)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        what = tag.rstrip("_") or "train"
        (out / "error.txt").write_text(f"{what}: exit {proc.returncode}: {last}\n")
    return proc.returncode == 0, time.perf_counter() - t0
