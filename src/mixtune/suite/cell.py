"""One cell of a suite: its run config, its MergeMix plan (if any), its training process.

- :func:`scenario_evals`: a scenario's evaluation domains under the suite's ``protocol``
  (``paper``: built-in targets and constraints on their dev split, each with a test twin).
- :func:`cell_raw`: the cell's run config (suite ``base`` + scenario datasets/evals + the
  method's mixer and loss + seed), with ``weights: targets``, sweep weights and constraint
  references resolved.
- :func:`references`: base-model losses per scenario *and seed* for ``reference_slack``
  (a run's evaluation examples are a seeded draw, so each seed has its own), measured in this
  process on exactly the cell's examples and cached in ``<output_dir>/references.json``.
- :func:`run_cell`: for a planner method, ``mixtune plan mergemix`` in a subprocess first (plan
  directory ``<output_dir>/plans/<cell key>``; a finished plan — ``plan.json`` plus
  ``seconds.txt`` — is reused on resume, and an interrupted one resumes its experts and cached
  merges), then ``mixtune train`` with the planned weights as a ``fixed`` mixer.
  ``wall.txt`` = planning + training wall time; ``plan_seconds.txt`` = the planning part.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mixtune.errors import ConfigError
from mixtune.suite.sweep import sweep_weights


def _copy(x):
    return json.loads(json.dumps(x))


def scenario_evals(suite, sc) -> list[dict]:
    """The evaluation domains of scenario ``sc`` as its cells run them (references unfilled).

    ``protocol: paper``: a built-in target or constraint domain read from its ``eval`` split
    is read from the ``dev`` half instead and gets a twin ``{name}-test`` (``role: test``,
    ``test_of: name``) on the ``test`` half, with the same batches; a domain with ``test_split:
    S`` gets a twin on split ``S``. Selection sees dev, the report reads test (suite_table.py).
    """
    evals, twins = [], []
    for e in _copy(list(sc.evals)):
        test_split = e.pop("test_split", None)
        evals.append(e)
        if suite.protocol != "paper":
            continue
        builtin = (
            str(e.get("path", "")).startswith("builtin:")
            and e.get("from_dataset") is None
            and e.get("role") in ("target", "constraint")
        )
        if builtin and e.get("split", "train") == "eval":
            e["split"] = "dev"  # test is the other half of eval: keep them apart
            test_split = test_split or "test"
        if test_split is not None:
            twin = {k: v for k, v in e.items() if k != "reference"}
            twins.append(
                {
                    **twin,
                    "name": f"{e['name']}-test",
                    "split": test_split,
                    "role": "test",
                    "test_of": e["name"],
                }
            )
    return evals + twins


def cell_raw(suite, cell, out: Path, refs: dict | None) -> dict:
    """The raw run config of ``cell`` (before the scenario's ``key=value`` overrides)."""
    sc, m = cell.scenario, cell.method
    raw = _copy(suite.base)
    evals = scenario_evals(suite, sc)
    if refs is not None:
        for e in evals:
            if (
                e.get("role") == "constraint"
                and e.get("reference") is None
                and e.get("metric", "loss") == "loss"
            ):
                base = refs[sc.name][cell.seed][e["name"]]
                e["reference"] = round(base + suite.reference_slack, 6)
    mixer = _copy(m.mixer)
    if m.point is not None:
        mixer = {"name": "fixed", "weights": sweep_weights(sc, m.point)}
    if mixer.get("weights") == "targets":
        targets = {e["name"] for e in sc.evals if e.get("role") == "target"}
        names = [d["name"] for d in sc.datasets if d["name"] in targets]
        if not names:
            raise ConfigError(
                f"methods.{m.name}.mixer.weights: 'targets' needs a training "
                f"dataset named like a target domain in scenario {sc.name}"
            )
        mixer["weights"] = {n: 1.0 for n in names}
    if m.planner is not None:
        mixer = {"name": "uniform"}  # replaced by the plan's fixed weights in run_cell
    raw.update(
        output_dir=str(out),
        seed=cell.seed,
        progress=False,
        datasets=_copy(list(sc.datasets)),
        evals=evals,
        mixer=mixer,
        loss={"name": cell.loss} if cell.loss else _copy(m.loss),
    )
    return raw


def plan_raw(suite, cell, run_raw: dict, plan_dir: Path) -> dict:
    """The MergeMix plan config of a planner cell: the method's options + the cell's run.

    The planner bounds every constraint by the base model as *it* measures it, on its own
    ``search.eval_batches``: the suite's references (measured on every batch of the domain)
    are left out of the plan's run, and a stated ``reference_slack`` is passed to the planner
    to add to its own base value. Test twins are left out too: plans never see test data.
    """
    opts = _copy(cell.method.planner)
    opts.pop("name")
    if suite.reference_slack is not None:
        opts.setdefault("reference_slack", suite.reference_slack)
    run = {
        **_copy(run_raw),
        "evals": [e for e in scenario_evals(suite, cell.scenario) if e.get("role") != "test"],
    }
    return {**opts, "run": run, "output_dir": str(plan_dir), "progress": False}


REFERENCES_FORMAT = 2  # {scenario: {seed: {fingerprint, loss: {domain: v}}}}; 1 had no seeds


def _reference_raw(suite, sc, seed: int) -> dict:
    """The run config whose step-0 evaluation is the base model on ``sc``'s cells of ``seed``."""
    raw = _copy(suite.base)
    raw.update(
        output_dir=str(Path(suite.output_dir) / "_references" / f"{sc.name}-s{seed}"),
        resume="never",
        progress=False,
        seed=seed,
        datasets=_copy(list(sc.datasets)),
        evals=[e for e in scenario_evals(suite, sc) if e.get("role") != "test"],
        mixer={"name": "proportional"},
    )
    return raw


def _fingerprint(raw: dict, overrides) -> str:
    """What decides the reference numbers: model, data, evaluation domains, seed, length."""
    keep = {k: raw.get(k) for k in ("model", "datasets", "evals", "seed")}
    keep["max_length"] = (raw.get("train") or {}).get("max_length")
    text = json.dumps([keep, list(overrides)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def references(suite, todo) -> dict | None:
    """{scenario: {seed: {domain: base-model loss}}} for ``reference_slack``, else None.

    ``todo``: the cells about to run; each (scenario, seed) among them is measured unless
    ``references.json`` holds it with the same fingerprint (an older format, or a changed
    scenario, is measured again).
    """
    if suite.reference_slack is None:
        return None
    path = Path(suite.output_dir) / "references.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if cache.get("format") != REFERENCES_FORMAT:
        cache = {"format": REFERENCES_FORMAT}
    wanted = {(c.scenario.name, c.seed): c.scenario for c in todo}
    missing = []
    for (name, seed), sc in wanted.items():
        fp = _fingerprint(_reference_raw(suite, sc, seed), sc.overrides)
        if cache.get(name, {}).get(str(seed), {}).get("fingerprint") != fp:
            missing.append((sc, seed, fp))
    if missing:
        import torch

        from mixtune import config as config_mod
        from mixtune.engine.loop import Trainer

        threads = torch.get_num_threads()
        torch.set_num_threads(suite.threads)
        try:
            for sc, seed, fp in missing:
                cfg = config_mod.load(data=_reference_raw(suite, sc, seed), overrides=sc.overrides)
                metrics = Trainer(cfg).evaluate(accuracy=False, use_cache=False)
                cache.setdefault(sc.name, {})[str(seed)] = {
                    "fingerprint": fp,
                    "loss": {d: float(v["loss"]) for d, v in metrics.items()},
                }
        finally:
            torch.set_num_threads(threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1))
    return {
        name: {int(seed): entry["loss"] for seed, entry in by_seed.items()}
        for name, by_seed in cache.items()
        if name != "format"
    }


def _env(suite) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(suite.threads),
        "MKL_NUM_THREADS": str(suite.threads),
        "TOKENIZERS_PARALLELISM": "false",
    }


def _run(args: list[str], suite, out: Path, tag: str) -> tuple[bool, float]:
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


def _plan(suite, cell, raw: dict, out: Path) -> tuple[dict, float] | None:
    """Plan (or reuse the cached plan of) a planner cell: (weights, planning seconds)."""
    plan_dir = Path(suite.output_dir) / "plans" / cell.key
    result, seconds = plan_dir / "plan.json", plan_dir / "seconds.txt"
    if not (result.is_file() and seconds.is_file()):
        plan_dir.mkdir(parents=True, exist_ok=True)
        spent = float(seconds.read_text()) if seconds.is_file() else 0.0
        (plan_dir / "suite_plan.yaml").write_text(
            yaml.safe_dump(plan_raw(suite, cell, raw, plan_dir), sort_keys=False)
        )
        result.unlink(missing_ok=True)
        ok, wall = _run(
            [
                "plan",
                cell.method.planner["name"],
                str(plan_dir / "suite_plan.yaml"),
                *[f"run.{o}" for o in cell.scenario.overrides],
            ],
            suite,
            out,
            "plan_",
        )
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
