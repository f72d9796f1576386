"""What a finished suite says beyond its table: noise, the slope model, DynamixSFT, test agreement.

Reads a suite's output directory (``mixtune bench standard`` writes ``runs/bench-standard``) and
prints the Markdown tables that bench/results/standard_suite.md quotes:

1. **Noise vs movement** per constraint domain: the median |change since step 0| at the end of
   the fixed-sweep runs with a target mass > 0 (what mixtures do to it), the median paired
   standard error of that change (``change_se``), their ratio, and the level standard error of
   the base value (``loss_se``: which examples were drawn).
2. **DynaMiCS's slope model**: at each update after the first, the prediction made at the
   previous update (L + H·S·w) against the value realised; median |error| per scenario next to
   the median |predicted change|, for each DynaMiCS method (faithful vs ``noise_margin``).
3. **DynamixSFT vs proportional**: mean held-out (test-split) loss over every target and
   constraint domain at the end, per seed, the relative difference and whether it exceeds the
   seed spread.
4. **Predicted feasibility**: per DynaMiCS method, the updates at which no candidate mixture
   was predicted feasible (the solver's fallback to the least-violating one), overall and at
   step 0, next to how many cells ended feasible.
5. **Dev-selected, test-checked**: of the cells whose selected checkpoint is feasible on dev,
   the share whose constraints also hold on the test split (each test twin at or below the
   base model's test value).
6. **Which constraint keeps cells infeasible**: per constraint domain, what the regulariser
   alone (the sweep's w = 0 runs) does to it by the end (median change and median paired
   standard error: a constraint nothing lowers beyond its noise is a coin flip under a strict
   reference), and per method the share of feasible cells among the scenarios that constrain
   it, against the share among those that do not.

Run (several directories are read as one: the noise-aware DynaMiCS runs in the extended
suite)::

    python bench/suite_analysis.py runs/bench-standard [runs/bench-extended ...]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mixtune.suite.table import select  # noqa: E402


def _cells(root: Path):
    for out in sorted((root / "cells").iterdir()):
        if not (out / "summary.json").is_file() or not (out / "cell.yaml").is_file():
            continue
        scenario, method, seed = out.name.split("--")
        recs = [
            json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()
        ]
        evals = {}
        for r in recs:
            if "eval" in r:
                evals[r["step"]] = r["eval"]
        domains = {
            e["name"]: {
                "role": e.get("role", "monitor"),
                "reference": e.get("reference"),
                "metric": e.get("metric", "loss"),
                "test_of": e.get("test_of"),
            }
            for e in yaml.safe_load((out / "cell.yaml").read_text())["evals"]
        }
        yield {
            "scenario": scenario,
            "method": method,
            "seed": seed,
            "recs": recs,
            "evals": sorted(evals.items()),
            "domains": domains,
            "weights": yaml.safe_load((out / "cell.yaml").read_text())["mixer"],
        }


def read(roots) -> list[dict]:
    """The finished cells of several suite directories as one set; a cell two suites share
    (the same scenario, method and seed, e.g. both suites' proportional) counts once, the
    first directory's."""
    cells, seen = [], set()
    for root in roots:
        for c in _cells(Path(root)):
            if (key := (c["scenario"], c["method"], c["seed"])) not in seen:
                seen.add(key)
                cells.append(c)
    return cells


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def _p90(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))] if xs else float("nan")


def noise_table(cells) -> str:
    move, se, level = {}, {}, {}
    for c in cells:
        if not c["method"].startswith("fixed-") or c["method"].endswith("-w0"):
            continue
        (_, first), (_, last) = c["evals"][0], c["evals"][-1]
        for d, info in c["domains"].items():
            if info["role"] != "constraint":
                continue
            move.setdefault(d, []).append(abs(last[d]["loss"] - first[d]["loss"]))
            se.setdefault(d, []).append(last[d].get("change_se"))
            level.setdefault(d, []).append(first[d].get("loss_se"))
    lines = [
        "| constraint | median abs change (sweep runs, w > 0) | median paired se of the "
        "change | ratio | base level se (n) |",
        "|---|---|---|---|---|",
    ]
    for d in sorted(move):
        m, s = _med(move[d]), _med(se[d])
        lines.append(f"| {d} | {m:.3f} | {s:.3f} | {m / s:.1f}x | {_med(level[d]):.3f} |")
    return "\n".join(lines)


def prediction_table(cells) -> str:
    rows: dict[tuple[str, str], list] = {}
    for c in cells:
        if not c["method"].startswith("dynamics"):
            continue
        prev = None
        for r in c["recs"]:
            m = r.get("mixer")
            if not isinstance(m, dict) or "predicted" not in m:
                continue
            if prev is not None and "prediction_error" in m:
                for d, err in m["prediction_error"].items():
                    if c["domains"].get(d, {}).get("role") == "constraint":
                        moved = abs(prev["predicted"][d] - prev["anchor"][d])
                        rows.setdefault((c["scenario"], c["method"]), []).append((abs(err), moved))
            prev = m
    methods = sorted({k[1] for k in rows})
    lines = [
        "| scenario | "
        + " | ".join(f"{m}: abs error median, p90 / abs predicted change median" for m in methods)
        + " |",
        "|---|" + "---|" * len(methods),
    ]
    for sc in sorted({k[0] for k in rows}):
        cells_ = []
        for m in methods:
            v = rows.get((sc, m), [])
            cells_.append(
                f"{_med([e for e, _ in v]):.4f}, {_p90([e for e, _ in v]):.4f} / "
                f"{_med([p for _, p in v]):.4f}"
                if v
                else "-"
            )
        lines.append(f"| {sc} | " + " | ".join(cells_) + " |")
    allm = [
        "| all | "
        + " | ".join(
            f"{_med([e for k, v in rows.items() if k[1] == m for e, _ in v]):.4f}, "
            f"{_p90([e for k, v in rows.items() if k[1] == m for e, _ in v]):.4f} / "
            f"{_med([p for k, v in rows.items() if k[1] == m for _, p in v]):.4f}"
            for m in methods
        )
        + " |"
    ]
    return "\n".join(lines + allm)


def dynamix_table(cells, a="dynamixsft", b="proportional") -> str:
    per = {}
    for c in cells:
        if c["method"] not in (a, b):
            continue
        _, last = c["evals"][-1]
        tests = [d for d, i in c["domains"].items() if i["role"] == "test"]
        per.setdefault((c["method"], c["seed"]), {})[c["scenario"]] = statistics.mean(
            last[d]["loss"] for d in tests
        )
    seeds = sorted({s for _, s in per})
    lines = [
        "| seed | " + f"{a} mean test loss | {b} mean test loss | relative gain of {a} |",
        "|---|---|---|---|",
    ]
    gains = []
    for s in seeds:
        x, y = per.get((a, s), {}), per.get((b, s), {})
        common = sorted(set(x) & set(y))
        if not common:
            continue
        mx, my = statistics.mean(x[k] for k in common), statistics.mean(y[k] for k in common)
        gains.append((my - mx) / my)
        lines.append(f"| {s} | {mx:.4f} | {my:.4f} | {100 * (my - mx) / my:+.2f}% |")
    pairs = [
        (per[(b, s)][k] - per[(a, s)][k]) / per[(b, s)][k]
        for s in seeds
        if (a, s) in per and (b, s) in per
        for k in set(per[(a, s)]) & set(per[(b, s)])
    ]
    if len(pairs) > 1:
        mean, sd = statistics.mean(pairs), statistics.stdev(pairs)
        lines.append(
            f"\nPer (scenario, seed) pairs: {sum(p > 0 for p in pairs)} of {len(pairs)} "
            f"favour {a}; mean {100 * mean:+.2f}% ± {100 * sd / len(pairs) ** 0.5:.2f}"
            " (standard error over pairs)."
        )
    if len(gains) > 1:
        lines.append(
            f"\nMean gain {100 * statistics.mean(gains):+.2f}%, seed spread "
            f"{100 * (max(gains) - min(gains)):.2f} points (min {100 * min(gains):+.2f}%"
            f", max {100 * max(gains):+.2f}%): the difference "
            f"{'exceeds' if min(gains) > 0 or max(gains) < 0 else 'does not exceed'} "
            "the seed spread (all seeds on one side of zero or not)."
        )
    return "\n".join(lines)


def agreement_table(cells) -> str:
    by_method: dict[str, list[bool]] = {}
    for c in cells:
        res = select(c["evals"], c["domains"])
        if not res["feasible"]:
            continue
        rec = dict(c["evals"])[res["selected_step"]]
        base = c["evals"][0][1]
        twins = {i["test_of"]: d for d, i in c["domains"].items() if i["role"] == "test"}
        held = all(
            rec[twins[d]]["loss"] <= base[twins[d]]["loss"]
            for d, i in c["domains"].items()
            if i["role"] == "constraint" and d in twins
        )
        by_method.setdefault(c["method"], []).append(held)
    lines = ["| method | dev-feasible cells | also feasible on test |", "|---|---|---|"]
    for m, v in sorted(by_method.items()):
        lines.append(f"| {m} | {len(v)} | {sum(v)} ({100 * sum(v) / len(v):.0f}%) |")
    return "\n".join(lines)


def feasible_table(cells) -> str:
    """Per DynaMiCS method: the updates at which the slope model predicted no candidate
    mixture feasible (``n_feasible`` 0: the solver falls back to the least-violating one),
    overall and at step 0 (where the anchor is the reference, so some constraint has a
    positive estimated slope under every dataset), against the cells' selection outcome."""
    counts: dict[str, list[int]] = {}
    for c in cells:
        if not c["method"].startswith("dynamics"):
            continue
        n = counts.setdefault(c["method"], [0, 0, 0, 0, 0, 0])
        for r in c["recs"]:
            m = r.get("mixer")
            if isinstance(m, dict) and "n_feasible" in m:
                none = m["n_feasible"] == 0
                n[0] += none
                n[1] += 1
                if r["step"] == 0:
                    n[2] += none
                    n[3] += 1
        n[4] += bool(select(c["evals"], c["domains"])["feasible"])
        n[5] += 1
    lines = [
        "| method | updates with no predicted-feasible mixture | at step 0 | cells feasible |",
        "|---|---|---|---|",
    ]
    for m, (z, u, z0, u0, f, k) in sorted(counts.items()):
        lines.append(f"| {m} | {z} of {u} | {z0} of {u0} | {f} of {k} |")
    return "\n".join(lines)


def blocking_table(cells, methods=None) -> str:
    """Per constraint domain: the regulariser-only runs' median change by the end (``*-w0``
    cells whose fixed mixture has one dataset: scenarios with a second non-target mix it in),
    with its median paired standard error, and for each method the feasible cells among the
    scenarios that constrain that domain against those that do not (by default the w = 0 runs
    and every method outside the sweep that is feasible anywhere). A constraint that nothing
    lowers beyond its noise shows as a low "with" share for every method."""
    feas = {id(c): bool(select(c["evals"], c["domains"])["feasible"]) for c in cells}
    # default columns: the regulariser alone, and every other method that is ever feasible
    methods = methods or sorted(
        {c["method"] for c in cells if c["method"].endswith("uniform-w0")}
        | {c["method"] for c in cells if feas[id(c)] and not c["method"].startswith("fixed-")}
    )
    constraints = sorted(
        {d for c in cells for d, i in c["domains"].items() if i["role"] == "constraint"}
    )
    lines = [
        "| constraint | regulariser alone: change by the end (paired se) | "
        + " | ".join(f"{m}: feasible with / without it" for m in methods)
        + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for d in constraints:
        moved, ses = [], []
        for c in cells:
            w = (c.get("weights") or {}).get("weights") or {}
            alone = sum(v > 0 for v in w.values()) == 1
            constrained = c["domains"].get(d, {}).get("role") == "constraint"
            if c["method"].endswith("-w0") and alone and constrained:
                (_, first), (_, last) = c["evals"][0], c["evals"][-1]
                moved.append(last[d]["loss"] - first[d]["loss"])
                ses.append(last[d].get("change_se"))
        row = [d, f"{_med(moved):+.3f} ({_med(ses):.3f})" if moved else "-"]
        for m in methods:
            mine = [c for c in cells if c["method"] == m]
            on = [c["domains"].get(d, {}).get("role") == "constraint" for c in mine]
            has = [feas[id(c)] for c, o in zip(mine, on) if o]
            not_ = [feas[id(c)] for c, o in zip(mine, on) if not o]
            row.append(f"{sum(has)}/{len(has)} / {sum(not_)}/{len(not_)}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    roots = [Path(a) for a in sys.argv[1:]] or [Path("runs/bench-standard")]
    cells = read(roots)
    print(f"{len(cells)} finished cells in {', '.join(map(str, roots))}\n")
    print("## Noise vs movement (constraints)\n\n" + noise_table(cells) + "\n")
    print(
        "## DynaMiCS slope model: prediction error at the next update (constraints)\n\n"
        + prediction_table(cells)
        + "\n"
    )
    print(
        "## DynamixSFT vs proportional (held-out test loss, all domains)\n\n"
        + dynamix_table(cells)
        + "\n"
    )
    print(
        "## DynaMiCS: updates where no mixture was predicted feasible\n\n"
        + feasible_table(cells)
        + "\n"
    )
    print("## Selected on dev, checked on test\n\n" + agreement_table(cells) + "\n")
    print("## Which constraint keeps cells infeasible\n\n" + blocking_table(cells))


if __name__ == "__main__":
    main()
