"""``mixtune demo``: the point of mixtune in one command, offline, on a laptop CPU.

The embedded base model (pretrained on dialogue, trivia, definitions, some arithmetic and
safety) is fine-tuned toward two new skills — ``code`` and ``word_problems`` (the targets) —
under three mixtures:

- ``target-only``: the targets' data alone. It erodes what the base knew (the constraint
  domains: trivia retention, safety refusals, dialogue).
- ``uniform``: a fixed mixture, equal shares of the targets' and the general data.
- ``dynamics``: DynaMiCS (:mod:`mixtune.mixers.dynamics`), told which domains are targets and
  which are constraints, and each constraint's reference: the base model's loss plus
  ``TOLERANCE``. It probes every dataset's effect at each evaluation, picks the mixture, and
  hands over its *answer*: the best evaluated step that kept every constraint (or the base
  model when none did) — not the last step.

The table compares every domain before and after (for DynaMiCS: at its answer) and marks each
constraint kept or broken: kept means its loss is at most ``TOLERANCE`` nats above the base
model's (a tiny model that has memorised a domain to a loss of 0.02 cannot be fine-tuned on
anything without some movement; the budget makes "erodes" mean erosion, and it is printed with
the table). It is the same rule DynaMiCS is given, so its verdict and the table's agree.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mixtune import config
from mixtune.engine.loop import Trainer
from mixtune.engine.rundir import read_metrics
from mixtune.report import write_report
from mixtune.report.answer import read_answer

TOLERANCE = 0.25  # nats a constraint domain's loss may rise and still count as kept
TARGETS = ("code", "word_problems")
GENERAL = ("trivia", "safety", "dialogue")
EVALS = (  # (domain, role, metric)
    ("code", "target", "loss"),
    ("word_problems", "target", "loss"),
    ("trivia", "constraint", "loss"),
    ("safety", "constraint", "loss"),
    ("dialogue", "constraint", "loss"),
    ("arithmetic", "monitor", "loss"),
)


ANSWERED = "dynamics"  # the cell whose table column is its answer, not its last step


@dataclass(frozen=True)
class Budget:
    steps: int
    batch_size: int
    eval_batches: int
    eval_every: int
    max_length: int
    lr: float
    update_every: int  # DynaMiCS's update interval (a divisor of eval_every)
    probe_steps: int  # DynaMiCS's c_max: training steps of each dataset's probe


FULL = Budget(
    200,
    batch_size=16,
    eval_batches=3,
    eval_every=50,
    max_length=192,
    lr=5e-4,
    update_every=50,
    probe_steps=12,
)
QUICK = Budget(
    40,
    batch_size=8,
    eval_batches=2,
    eval_every=20,
    max_length=160,
    lr=1e-3,
    update_every=20,
    probe_steps=20,
)


def mixtures(quick: bool = False) -> dict[str, dict]:
    """The mixtures compared: targets only, a fixed mixture, and DynaMiCS, which updates the
    mixture every ``update_every`` steps (at the evaluations, recycled as its anchors) from
    probes of ``probe_steps`` steps per dataset. Forgetting a memorised domain saturates within
    a few steps, so a probe shorter than the interval, extrapolated linearly, overstates it and
    makes DynaMiCS cautious; probes as long as the interval (the quick demo) cost more."""
    budget = QUICK if quick else FULL
    return {
        "target-only": {"name": "fixed", "weights": {t: 1 for t in TARGETS}},
        "uniform": {"name": "uniform"},
        ANSWERED: {
            "name": "dynamics",
            "schedule": "fixed",
            "interval": budget.update_every,
            "c_max": budget.probe_steps,
            "probe_batches": budget.eval_batches,
        },
    }


def scenario(
    out_dir: Path, mixer: dict, budget: Budget, seed: int, references: dict | None = None
) -> dict:
    """The run config (as a dict) of one demo cell; ``references``: the constraints' (the
    DynaMiCS cell's, which also saves every evaluated step so its answer can be loaded)."""
    answered = references is not None
    return {
        "output_dir": str(out_dir),
        "seed": seed,
        "max_steps": budget.steps,
        "resume": "never",
        "model": {"name_or_path": "builtin"},
        "datasets": [{"name": d, "path": f"builtin:{d}"} for d in (*TARGETS, *GENERAL)],
        "evals": [
            {
                "name": d,
                "path": f"builtin:{d}",
                "split": "eval",
                "role": role,
                "metric": metric,
                "batches": budget.eval_batches,
                "batch_size": 16,
                "accuracy": d in ("word_problems", "trivia", "safety", "arithmetic"),
                "max_new_tokens": 12,
                **({"reference": references[d]} if answered and role == "constraint" else {}),
            }
            for d, role, metric in EVALS
        ],
        "mixer": mixer,
        "train": {
            "batch_size": budget.batch_size,
            "lr": budget.lr,
            "schedule": "cosine",
            "warmup_steps": 0,  # DynaMiCS probes at step 0 need the run's real LR
            "max_length": budget.max_length,
            "eval_every": budget.eval_every,
            "log_every": 10,
            "save_every": budget.eval_every if answered else 0,
            "keep_checkpoints": budget.steps // budget.eval_every + 1,
            "packing": True,  # padding-free steps: the same losses, about half the time here
        },
    }


def run_demo(
    output_dir: str | Path = "runs/demo",
    quick: bool = False,
    seed: int = 0,
    only: list[str] | None = None,
) -> dict:
    """Train every mixture, print the comparison, write ``<output_dir>/report.html``."""
    budget = QUICK if quick else FULL
    root = Path(output_dir)
    cells = {k: v for k, v in mixtures(quick).items() if not only or k in only}
    t0 = time.perf_counter()
    for name in cells:
        if (root / name).exists():  # a demo run is cheap: start each cell fresh
            shutil.rmtree(root / name)
    # DynaMiCS is told the table's rule (base loss + TOLERANCE) before any cell trains, so the
    # cells are independent and run side by side, one process and one thread each: the tiny
    # model gains nothing from a second thread, and the machine's cores do the cells at once.
    refs = references(base_losses(root, budget, seed)) if ANSWERED in cells else None
    raws = {
        name: scenario(root / name, mixer, budget, seed, refs if name == ANSWERED else None)
        for name, mixer in cells.items()
    }
    for name, raw in raws.items():  # one progress bar (the longest cell), not interleaved ones
        raw["progress"] = raw.get("progress", True) and name == next(iter(_longest_first(raws)))
    workers = max(1, min(len(cells), os.cpu_count() or 1))
    print(
        f"{len(cells)} mixtures x {budget.steps} steps, {workers} at a time: " + ", ".join(cells),
        flush=True,
    )
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        # The longest cell (DynaMiCS, with its probes) first, so it never waits for a core.
        futures = {name: pool.submit(_run_cell, raws[name]) for name in _longest_first(raws)}
        summaries = {}
        for name in cells:
            summaries[name] = futures[name].result()
            print(f"  done: {name} ({summaries[name]['seconds']:.0f} s)", flush=True)
    results = {
        name: cell_result(root / name, summaries[name], answered=name == ANSWERED) for name in cells
    }
    table = comparison_table(results)
    print(table)
    (root / "results.json").write_text(json.dumps(results, indent=1))
    (root / "results.md").write_text(table + "\n")
    if ANSWERED in results:
        print(f"DynaMiCS's answer: {results[ANSWERED]['answer']['headline']}")
    html = _write_html(root, results, table)
    print(f"report: {html}   ({time.perf_counter() - t0:.0f} s in all)")
    return results


def _longest_first(cells) -> list[str]:
    """Cell names, DynaMiCS (probes: the longest) first."""
    return sorted(cells, key=lambda name: name != ANSWERED)


def _run_cell(raw: dict) -> dict:
    """One cell, in a worker process: train, write its report; its summary."""
    import torch

    torch.set_num_threads(1)
    summary = Trainer(config.load(data=raw)).run()
    write_report(Path(raw["output_dir"]))
    return summary


def references(base: dict) -> dict[str, float]:
    """Each constraint's reference: the base model's loss plus ``TOLERANCE``."""
    return {d: base[d]["loss"] + TOLERANCE for d, role, _ in EVALS if role == "constraint"}


def base_losses(root: Path, budget: Budget, seed: int) -> dict:
    """The base model's evaluation (losses) on the demo's examples, measured without training
    (DynaMiCS's references, set before the cells run side by side)."""
    raw = scenario(root / "_base", {"name": "uniform"}, budget, seed)
    trainer = Trainer(config.load(data=raw), writer=False)  # evaluates only: no lock
    return trainer.evaluate(accuracy=False, use_cache=False)


def cell_result(run_dir: Path, summary: dict, answered: bool) -> dict:
    """What the table shows of one cell: the base model's evaluation, the one of the model it
    hands over (the last step; DynaMiCS: its answer) and, for DynaMiCS, the answer itself."""
    records = read_metrics(run_dir)
    evals = {r["step"]: r["eval"] for r in records if "eval" in r}
    out = {
        "before": evals[0],
        "after": evals[max(evals)],
        "step": max(evals),
        "last_step": max(evals),
        "seconds": summary["seconds"],
        "weights": summary["weights"],
        "model": str(run_dir / "final"),
    }
    ans = read_answer(run_dir, records, summary) if answered else None
    if ans is not None:
        out.update(
            after=evals[0 if ans.step is None else ans.step],
            step=ans.step,
            model=ans.path,
            answer={
                "step": ans.step,
                "held": ans.held,
                "constraints": [r.name for r in ans.constraints],
                "target_gain": ans.target_gain,
                "headline": ans.headline(),
            },
        )
    return out


def comparison_table(results: dict[str, dict]) -> str:
    """Markdown: per domain, the base model and each mixture (loss, accuracy, kept/broken)."""
    names = list(results)
    base = next(iter(results.values()))["before"]
    head = "| domain | role | base loss / acc | " + " | ".join(names) + " |"
    rows = [head, "|" + "---|" * (3 + len(names))]
    for dom, role, _ in EVALS:
        b = base[dom]
        cells = []
        for n in names:
            a = results[n]["after"][dom]
            mark = ""
            if role == "constraint":
                mark = " ✓ kept" if a["loss"] <= b["loss"] + TOLERANCE else " ✗ broken"
            cells.append(f"{_m(a)}{mark}")
        rows.append(f"| {dom} | {role} | {_m(b)} | " + " | ".join(cells) + " |")
    cons = [d for d, role, _ in EVALS if role == "constraint"]
    tgts = [d for d, role, _ in EVALS if role == "target"]

    def held(n):
        return sum(results[n]["after"][d]["loss"] <= base[d]["loss"] + TOLERANCE for d in cons)

    def gain(n):
        return sum(results[n]["after"][d]["loss"] - base[d]["loss"] for d in tgts)

    def step(n):
        r = results[n]
        if r["step"] is None:
            return "base model kept"
        return f"{r['step']} (answer)" if "answer" in r else f"{r['step']} (last)"

    for label, cell in (
        ("model at step", step),
        ("constraints kept", lambda n: f"{held(n)}/{len(cons)}"),
        ("target loss change", lambda n: f"{gain(n):+.3f}"),
        ("wall time", lambda n: f"{results[n]['seconds']:.0f} s"),
    ):
        rows.append(f"| {label} | | | " + " | ".join(cell(n) for n in names) + " |")
    return "\n".join(rows) + (
        f"\n\nLoss / exact-match accuracy on held-out examples, of the model each mixture "
        f"hands over: its last step, and for {ANSWERED} (DynaMiCS) its answer, the best "
        "evaluated step that kept every constraint (or the base model when none did). A "
        f"constraint is kept when its loss is at most {TOLERANCE} nats above the base model's "
        "(DynaMiCS is given the same references). Target loss change: summed over the targets, "
        "from the base model."
    )


def _m(m: dict) -> str:
    acc = f" / {m['accuracy']:.2f}" if "accuracy" in m else ""
    return f"{m['loss']:.3f}{acc}"


def _write_html(root: Path, results: dict, table: str) -> Path:
    import html

    rows = []
    for line in table.splitlines():
        if not line.startswith("|") or set(line) <= set("|-"):
            continue
        tag = "th" if not rows else "td"
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
    links = "".join(
        f"<li><a href='{n}/report/index.html'>{html.escape(n)}</a>: final weights "
        + ", ".join(f"{k} {v:.2f}" for k, v in r["weights"].items())
        + "</li>"
        for n, r in results.items()
    )
    imgs = "".join(
        f"<h3>{html.escape(n)}</h3><img src='{n}/report/weights.png'>"
        f"<img src='{n}/report/eval_loss.png'>"
        + (
            f"<img src='{n}/report/mixer_matrix_00_history.png'>"
            f"<img src='{n}/report/mixer_predictions.png'>"
            if n == ANSWERED and (root / n / "report/mixer_matrix_00_history.png").is_file()
            else ""
        )
        for n in results
    )
    verdict = ""
    if ANSWERED in results:
        a, r = results[ANSWERED]["answer"], results[ANSWERED]
        held, cons = a["held"], a["constraints"]
        broken = [c for c in cons if c not in held]
        at = "the base model (no evaluated step kept every constraint)"
        if a["step"] is not None:
            at = f"step {a['step']} of {r['last_step']}"
        verdict = (
            "<h2>DynaMiCS's answer</h2><p class='verdict'>"
            f"Chosen: <b>{html.escape(at)}</b>. Constraints held: "
            f"<b>{len(held)}/{len(cons)}</b> ({html.escape(', '.join(held) or 'none')}"
            + (f"; broken: {html.escape(', '.join(broken))}" if broken else "")
            + f"). Summed target loss {-a['target_gain']:+.3f} from the base model. Model: "
            f"<code>{html.escape(str(r['model']))}</code>. "
            f"<a href='{ANSWERED}/report/index.html'>Its report</a> shows the slope matrix at "
            "each update and its predictions against what happened.</p>"
        )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mixtune demo</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
        "img{max-width:49%}</style></head><body><h1>mixtune demo</h1>"
        "<p>Targets: code, word_problems. Constraints: trivia, safety, dialogue (kept = loss "
        f"at most {TOLERANCE} nats above the base model's). Loss / exact-match accuracy on "
        "held-out examples, of the model each mixture hands over (DynaMiCS: its answer).</p>"
        + verdict
        + "<table>"
        + "".join(rows)
        + "</table><ul>"
        + links
        + "</ul>"
        + imgs
        + "</body></html>"
    )
    path = root / "report.html"
    path.write_text(page)
    return path
