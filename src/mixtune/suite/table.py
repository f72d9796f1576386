"""A suite's table: per-cell numbers, one row per method (and loss); written out by results.py.

Every cell is read the way the DynaMiCS paper reads a run (§1.6; docs/bench.md):

- **selection**: at each scheduled evaluation after step 0, on the selection domains (dev under
  ``protocol: paper``), a step is feasible when every constraint is at or below its reference
  (strict: the base model's value at step 0, unless the cell states one) and the summed target
  loss is below step 0's; the feasible step with the lowest summed target loss is selected
  (:func:`select`);
- **test PPL Δ%** = 1 - exp(mean over targets of (L_sel - L_base)), the geometric-mean
  perplexity reduction of the targets, and **test loss Δ%**, the relative reduction of their
  summed loss, both at the selected step on the test twins (role ``test``) against the base
  model's test values; an infeasible cell scores 0 on both. Targets without a test twin are
  reported on their selection split (``reported_on: eval``; noted under the table);
- **feasible**: the cell has a feasible step; **step**: the selected step;
- end of run, beside them: **target Δ% (end)** (mean target loss, step 0 -> end), **feasible
  (end)** (constraints only), **accuracy**, **forgetting** (mean loss increase over constraint
  and monitor domains, 0 when none grew);
- **time**, **cost**: median wall time of a cell (a planner method's includes its planning),
  and as a multiple of the ``baseline`` method's median; **plan (s)**: the planning part.

Rows aggregate as the paper does: the median over scenarios of the per-scenario mean over
seeds. The **seed range** of test PPL Δ% is the min-max over seeds of that seed's median over
scenarios: a difference between two rows smaller than it is within seed noise. Feasible shares
are over cells, the selected step is the median over feasible cells, times are medians over
cells. A sweep adds **<sweep>: best single** (the member with the best test PPL Δ%) and
**<sweep>: oracle** (per scenario, the member with the best mean over seeds; its time is the
whole sweep's per scenario and seed, as finding it takes every member's run).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import yaml

from mixtune.eval.constraints import select_best_feasible
from mixtune.mixers.base import DomainInfo


def _float(path: Path) -> float | None:
    return float(path.read_text()) if path.is_file() else None


def _value(rec: dict, d: str, metric: str) -> float:
    return rec[d]["accuracy" if metric == "accuracy" and "accuracy" in rec[d] else "loss"]


def _within(rec: dict, base: dict, d: str, info: dict) -> bool:
    """Whether constraint ``d`` keeps its reference in ``rec`` (null reference: the base's)."""
    metric = "accuracy" if info["metric"] == "accuracy" and "accuracy" in rec[d] else "loss"
    ref = info["reference"] if info["reference"] is not None else _value(base, d, metric)
    v = _value(rec, d, metric)
    return v >= ref if metric == "accuracy" else v <= ref


def select(evals: list[tuple[int, dict]], domains: dict[str, dict]) -> dict:
    """The paper's checkpoint of one run and its test numbers.

    The step is chosen by :func:`mixtune.eval.constraints.select_best_feasible`, the rule
    behind every run's ``summary.json`` (targets and constraints in their metric, loss-like);
    the numbers reported at it are the targets' losses on their test twins.

    Args:
        evals: ``(step, eval record)`` of every scheduled evaluation, in step order; the
            first is the base model (step 0).
        domains: ``{name: {role, reference, metric, test_of}}`` as the cell ran them.

    Returns:
        ``selected_step`` (None when no step is feasible), ``feasible``, ``test_ppl_delta``
        and ``test_loss_delta`` (0 when infeasible; None without targets) and ``reported_on``
        (``test`` when every target has a test twin, else ``eval``).
    """
    (_, base) = evals[0]
    targets = [d for d, i in domains.items() if i["role"] == "target"]
    twins = {i["test_of"]: d for d, i in domains.items() if i["role"] == "test"}
    on_test = bool(targets) and all(t in twins for t in targets)
    out = {
        "selected_step": None,
        "feasible": False,
        "test_ppl_delta": None,
        "test_loss_delta": None,
        "reported_on": "test" if on_test else "eval",
    }
    if not targets:
        return out
    # The run's own rule (eval.constraints.select_best_feasible, as summary.json's
    # best_feasible), on the selection domains; test twins never take part.
    seen = [
        DomainInfo(d, i["role"], i["metric"], i["reference"])
        for d, i in domains.items()
        if i["role"] in ("target", "constraint")
    ]
    best = select_best_feasible([{"step": s, "eval": rec} for s, rec in evals], seen)
    out.update(feasible=best["feasible"], test_ppl_delta=0.0, test_loss_delta=0.0)
    if best["feasible"]:
        rec = dict(evals)[best["step"]]
        report = [twins[t] if on_test else t for t in targets]
        diffs = [rec[d]["loss"] - base[d]["loss"] for d in report]
        out.update(
            selected_step=best["step"],
            test_ppl_delta=1 - math.exp(statistics.mean(diffs)),
            test_loss_delta=-sum(diffs) / sum(base[d]["loss"] for d in report),
        )
    return out


def _evals(out: Path) -> list[tuple[int, dict]]:
    """(step, eval) of the run's scheduled evaluations; a step logged twice keeps its last."""
    by_step = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "eval" in rec:
                by_step[rec["step"]] = rec["eval"]
    return sorted(by_step.items())


def _domains(cell, out: Path) -> dict[str, dict]:
    """The cell's evaluation domains as it ran them (references filled in cell.yaml)."""
    ran = out / "cell.yaml"
    evals = yaml.safe_load(ran.read_text())["evals"] if ran.is_file() else cell.scenario.evals
    return {
        e["name"]: {
            "role": e.get("role", "monitor"),
            "reference": e.get("reference"),
            "metric": e.get("metric", "loss"),
            "test_of": e.get("test_of"),
        }
        for e in evals
    }


def cell_result(suite, cell) -> dict:
    """The numbers of one finished cell (or its error); a sweep alias reads its shared run."""
    out = Path(suite.output_dir) / "cells" / cell.run_key
    if (out / "error.txt").is_file() or not (out / "summary.json").is_file():
        err = out / "error.txt"
        return {"error": err.read_text().strip() if err.is_file() else "missing"}
    summary = json.loads((out / "summary.json").read_text())
    evals, domains = _evals(out), _domains(cell, out)
    result = select(evals, domains)
    before, after = evals[0][1], evals[-1][1]
    roles = {d: i["role"] for d, i in domains.items()}
    targets = [d for d, role in roles.items() if role == "target"]
    t0 = statistics.mean(before[d]["loss"] for d in targets) if targets else None
    t1 = statistics.mean(after[d]["loss"] for d in targets) if targets else None
    feasible_end = all(
        _within(after, before, d, domains[d]) for d, role in roles.items() if role == "constraint"
    )
    accs = [m["accuracy"] for d, m in after.items() if "accuracy" in m and roles.get(d) != "test"]
    kept = [d for d, role in roles.items() if role in ("constraint", "monitor")]
    forgetting = (
        statistics.mean(max(0.0, after[d]["loss"] - before[d]["loss"]) for d in kept)
        if kept
        else None
    )
    wall = _float(out / "wall.txt")
    return {
        **result,
        "target_delta": None if t0 is None else (t0 - t1) / t0,
        "feasible_end": feasible_end,
        "accuracy": statistics.mean(accs) if accs else None,
        "forgetting": forgetting,
        "seconds": wall if wall is not None else summary["seconds"],
        "plan_seconds": _float(out / "plan_seconds.txt"),
    }


# ---------------------------------------------------------------------------------------------

MEDIAN_OF_MEANS = ("test_ppl_delta", "test_loss_delta", "target_delta", "accuracy", "forgetting")


def _median_of_means(entries: list, key: str) -> tuple[float | None, dict[str, float]]:
    """Median over scenarios of the mean over seeds; also the per-scenario means."""
    by_sc: dict[str, list[float]] = {}
    for c, r in entries:
        if r.get(key) is not None:
            by_sc.setdefault(c.scenario.name, []).append(r[key])
    means = {sc: statistics.mean(v) for sc, v in by_sc.items()}
    return (statistics.median(means.values()) if means else None), means


def _seed_range(entries: list, key: str) -> tuple[float | None, float | None]:
    """Min and max over seeds of the median over scenarios of that seed's cells."""
    by_seed: dict[int, list[float]] = {}
    for c, r in entries:
        if r.get(key) is not None:
            by_seed.setdefault(c.seed, []).append(r[key])
    meds = [statistics.median(v) for v in by_seed.values()]
    return (min(meds), max(meds)) if meds else (None, None)


def _row(label: str, entries: list, base_time: float | None) -> dict:
    """One row from its ``(cell, result)`` entries."""
    ok = [(c, r) for c, r in entries if "error" not in r]
    row: dict = {"method": label, "cells": len(entries), "failed": len(entries) - len(ok)}
    for key in MEDIAN_OF_MEANS:
        row[key], means = _median_of_means(ok, key)
        if key == "test_ppl_delta":
            row["by_scenario"] = means
    row["ppl_seed_min"], row["ppl_seed_max"] = _seed_range(ok, "test_ppl_delta")
    for key in ("feasible", "feasible_end"):
        row[key] = (sum(r[key] for _, r in ok) / len(ok)) if ok else None
    steps = [r["selected_step"] for _, r in ok if r["selected_step"] is not None]
    row["selected_step"] = statistics.median(steps) if steps else None
    for key in ("seconds", "plan_seconds"):
        vals = [r[key] for _, r in ok if r[key] is not None]
        row[key] = statistics.median(vals) if vals else None
    row["cost"] = (row["seconds"] / base_time) if base_time and row["seconds"] else None
    on = {r["reported_on"] for _, r in ok}
    row["reported_on"] = on.pop() if len(on) == 1 else ("mixed" if on else None)
    row["errors"] = sorted({r["error"] for _, r in entries if "error" in r})
    row["per_cell"] = [
        {"key": c.key, "scenario": c.scenario.name, "seed": c.seed, "run": c.run_key, **r}
        for c, r in entries
    ]
    return row


def _sweep_rows(
    family: str, members: list[str], rows: dict, by_label: dict, base_time: float | None
) -> list[dict]:
    """The sweep's best single member and its per-scenario oracle."""
    scored = [rows[m] for m in members if rows[m]["test_ppl_delta"] is not None]
    if not scored:
        return []
    best = max(scored, key=lambda r: r["test_ppl_delta"])  # first of the sweep order on a tie
    out = [
        {
            **best,
            "method": f"{family}: best single",
            "derived": "best single",
            "config": best["method"],
        }
    ]
    chosen: dict[str, str] = {}
    for m in members:
        for sc, v in rows[m]["by_scenario"].items():
            if sc not in chosen or v > rows[chosen[sc]]["by_scenario"][sc]:
                chosen[sc] = m
    entries = [(c, r) for m in members for c, r in by_label[m] if chosen.get(c.scenario.name) == m]
    oracle = _row(f"{family}: oracle", entries, base_time)
    # what finding the oracle costs: every distinct run of the sweep, per scenario and seed
    spent: dict[tuple, float] = {}
    runs = {c.run_key: (c, r) for m in members for c, r in by_label[m] if "error" not in r}
    for c, r in runs.values():
        spent[c.scenario.name, c.seed] = spent.get((c.scenario.name, c.seed), 0.0) + r["seconds"]
    oracle["seconds"] = statistics.median(spent.values()) if spent else None
    oracle["cost"] = (oracle["seconds"] / base_time) if base_time and oracle["seconds"] else None
    out.append({**oracle, "derived": "oracle", "config": chosen})
    return out


def aggregate(suite, all_cells) -> list[dict]:
    """The table's rows: one per method (and loss), in suite order, each sweep followed by its
    best-single and oracle rows; every cell's result is read once (aliases share it)."""
    by_label: dict[str, list] = {}
    results: dict[str, dict] = {}  # by run key: aliased sweep members read their run once
    family: dict[str, str] = {}
    for c in all_cells:
        if c.run_key not in results:
            results[c.run_key] = cell_result(suite, c)
        by_label.setdefault(c.label, []).append((c, results[c.run_key]))
        if c.family is not None:
            family[c.label] = c.family
    base_times = [r["seconds"] for c, r in by_label.get(suite.baseline, []) if "error" not in r]
    base_time = statistics.median(base_times) if base_times else None
    rows = {label: _row(label, entries, base_time) for label, entries in by_label.items()}
    out = []
    for label in by_label:
        out.append(rows[label])
        fam = family.get(label)
        members = [m for m in by_label if family.get(m) == fam]
        if fam is not None and label == members[-1]:
            out += _sweep_rows(fam, members, rows, by_label, base_time)
    return out
