"""One cell of a suite: its run config, its MergeMix plan (if any), its training process.

- :func:`cell_raw`: the cell's run config (suite ``base`` + scenario datasets/evals + the
  method's mixer and loss + seed), with ``weights: targets`` and constraint references resolved.
- :func:`references`: base-model losses per scenario for ``reference_slack``, measured once in
  this process and cached in ``<output_dir>/references.json``.
- :func:`run_cell`: for a planner method, ``mixtune plan mergemix`` in a subprocess first (plan
  directory ``<output_dir>/plans/<cell key>``; a finished plan — ``plan.json`` plus
  ``seconds.txt`` — is reused on resume, and an interrupted one resumes its experts and cached
  merges), then ``mixtune train`` with the planned weights as a ``fixed`` mixer.
  ``wall.txt`` = planning + training wall time; ``plan_seconds.txt`` = the planning part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mixtune.errors import ConfigError


def _copy(x):
    return json.loads(json.dumps(x))


def cell_raw(suite, cell, out: Path, refs: dict | None) -> dict:
    """The raw run config of ``cell`` (before the scenario's ``key=value`` overrides)."""
    sc, m = cell.scenario, cell.method
    raw = _copy(suite.base)
    evals = _copy(list(sc.evals))
    if refs is not None:
        for e in evals:
            if e.get("role") == "constraint" and e.get("reference") is None:
                e["reference"] = round(refs[sc.name][e["name"]] + suite.reference_slack, 6)
    mixer = _copy(m.mixer)
    if mixer.get("weights") == "targets":
        targets = {e["name"] for e in sc.evals if e.get("role") == "target"}
        names = [d["name"] for d in sc.datasets if d["name"] in targets]
        if not names:
            raise ConfigError(f"methods.{m.name}.mixer.weights: 'targets' needs a training "
                              f"dataset named like a target domain in scenario {sc.name}")
        mixer["weights"] = {n: 1.0 for n in names}
    if m.planner is not None:
        mixer = {"name": "uniform"}  # replaced by the plan's fixed weights in run_cell
    raw.update(output_dir=str(out), seed=cell.seed, progress=False,
               datasets=_copy(list(sc.datasets)), evals=evals, mixer=mixer,
               loss={"name": cell.loss} if cell.loss else _copy(m.loss))
    return raw


def plan_raw(cell, run_raw: dict, plan_dir: Path) -> dict:
    """The MergeMix plan config of a planner cell: the method's options + the cell's run."""
    opts = _copy(cell.method.planner)
    opts.pop("name")
    return {**opts, "run": run_raw, "output_dir": str(plan_dir), "progress": False}


def references(suite, scenarios) -> dict | None:
    """{scenario: {domain: base-model loss}} for ``reference_slack`` (cached), else None."""
    if suite.reference_slack is None:
        return None
    path = Path(suite.output_dir) / "references.json"
    refs = json.loads(path.read_text()) if path.is_file() else {}
    missing = [s for s in scenarios if s.name not in refs]
    if missing:
        import torch

        from mixtune import config as config_mod
        from mixtune.engine.loop import Trainer

        threads = torch.get_num_threads()
        torch.set_num_threads(suite.threads)
        try:
            for sc in missing:
                raw = _copy(suite.base)
                raw.update(output_dir=str(Path(suite.output_dir) / "_references" / sc.name),
                           resume="never", progress=False, datasets=_copy(list(sc.datasets)),
                           evals=_copy(list(sc.evals)), mixer={"name": "proportional"})
                cfg = config_mod.load(data=raw, overrides=sc.overrides)
                metrics = Trainer(cfg).evaluate(accuracy=False, use_cache=False)
                refs[sc.name] = {d: float(v["loss"]) for d, v in metrics.items()}
        finally:
            torch.set_num_threads(threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(refs, indent=1))
    return refs


def _env(suite) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(suite.threads),
            "MKL_NUM_THREADS": str(suite.threads), "TOKENIZERS_PARALLELISM": "false"}


def _run(args: list[str], suite, out: Path, tag: str) -> tuple[bool, float]:
    """Run ``python -m mixtune ARGS``; logs to out/<tag>.{stdout,stderr}.txt, error.txt."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mixtune", *args], env=_env(suite),
                          capture_output=True, text=True)
    (out / f"{tag}stdout.txt").write_text(proc.stdout)
    (out / f"{tag}stderr.txt").write_text(proc.stderr)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        what = tag.rstrip("_") or "train"
        (out / "error.txt").write_text(f"{what}: exit {proc.returncode}: {last}\n")
    return proc.returncode == 0, time.perf_counter() - t0


def _plan(suite, cell, raw: dict, out: Path) -> tuple[dict, float] | None:
    """Plan (or reuse the cached plan of) a planner cell: (weights, planning seconds)."""
    plan_dir = Path(suite.output_dir) / "plans" / cell.key
    result, seconds = plan_dir / "plan.json", plan_dir / "seconds.txt"
    if not (result.is_file() and seconds.is_file()):
        plan_dir.mkdir(parents=True, exist_ok=True)
        spent = float(seconds.read_text()) if seconds.is_file() else 0.0
        (plan_dir / "suite_plan.yaml").write_text(
            yaml.safe_dump(plan_raw(cell, raw, plan_dir), sort_keys=False))
        result.unlink(missing_ok=True)
        ok, wall = _run(["plan", cell.method.planner["name"], str(plan_dir / "suite_plan.yaml"),
                         *[f"run.{o}" for o in cell.scenario.overrides]], suite, out, "plan_")
        # Time of every attempt counts (an interrupted plan resumes, its work is not redone).
        seconds.write_text(f"{spent + wall:.3f}\n")
        if not ok:
            result.unlink(missing_ok=True)
            return None
    weights = json.loads(result.read_text())["weights"]
    return weights, float(seconds.read_text())


def run_cell(suite, cell, out: Path, refs: dict | None) -> None:
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
        weights, plan_seconds = planned
        raw["mixer"] = {"name": "fixed", "weights": weights}
        (out / "plan_seconds.txt").write_text(f"{plan_seconds:.3f}\n")
    (out / "cell.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    ok, wall = _run(["train", str(out / "cell.yaml"), *cell.scenario.overrides], suite, out, "")
    if ok:
        (out / "error.txt").unlink(missing_ok=True)
        (out / "wall.txt").write_text(f"{plan_seconds + wall:.3f}\n")
