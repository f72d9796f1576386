"""``mixtune demo``: the point of mixtune in one command, offline, on a laptop CPU.

The embedded base model (pretrained on dialogue, trivia, definitions, some arithmetic and
safety) is fine-tuned toward two new skills — ``code`` and ``word_problems`` (the targets) —
under several mixtures. Fine-tuning on the targets alone erodes what the base knew (the
constraint domains: trivia retention, safety refusals, dialogue); mixing general data back in
keeps them; the dynamic mixers decide the mixture themselves. The table compares every domain
before and after, and marks each constraint kept or broken: kept means its loss ended at most
``TOLERANCE`` nats above the base model's (a tiny model that has memorised a domain to a loss of
0.02 cannot be fine-tuned on anything without some movement; the budget makes "erodes" mean
erosion, and it is printed with the table).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from mixtune import config
from mixtune.engine.loop import Trainer
from mixtune.registry import MIXERS
from mixtune.report import write_report

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


@dataclass(frozen=True)
class Budget:
    steps: int
    batch_size: int
    eval_batches: int
    eval_every: int
    max_length: int
    lr: float


FULL = Budget(steps=200, batch_size=16, eval_batches=3, eval_every=50, max_length=192, lr=5e-4)
QUICK = Budget(steps=40, batch_size=8, eval_batches=2, eval_every=20, max_length=160, lr=1e-3)


def mixtures(quick: bool = False) -> dict[str, dict]:
    """The mixtures compared: the static pair always; the full demo adds the dynamic mixers
    that are registered (they need more than the quick demo's 40 steps to mean anything)."""
    out = {
        "target-only": {"name": "fixed", "weights": {t: 1 for t in TARGETS}},
        "uniform": {"name": "uniform"},
    }
    if not quick and "dynamixsft" in MIXERS:
        out["dynamixsft"] = {"name": "dynamixsft", "update_every": 25}
    return out


def scenario(out_dir: Path, mixer: dict, budget: Budget, seed: int) -> dict:
    """The run config (as a dict) of one demo cell."""
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
            }
            for d, role, metric in EVALS
        ],
        "mixer": mixer,
        "train": {
            "batch_size": budget.batch_size,
            "lr": budget.lr,
            "schedule": "cosine",
            "warmup_steps": 5,
            "max_length": budget.max_length,
            "eval_every": budget.eval_every,
            "log_every": 10,
            "save_every": 0,
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
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    for i, (name, mixer) in enumerate(cells.items(), 1):
        print(f"[{i}/{len(cells)}] mixture '{name}' ({budget.steps} steps)", flush=True)
        run_dir = root / name
        if run_dir.exists():  # a demo run is cheap: start each cell fresh
            import shutil

            shutil.rmtree(run_dir)
        cfg = config.load(data=scenario(run_dir, mixer, budget, seed))
        summary = Trainer(cfg).run()
        write_report(run_dir)
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if "eval" in r]
        results[name] = {
            "before": evals[0]["eval"],
            "after": evals[-1]["eval"],
            "seconds": summary["seconds"],
            "weights": summary["weights"],
        }
    table = comparison_table(results)
    print(table)
    (root / "results.json").write_text(json.dumps(results, indent=1))
    (root / "results.md").write_text(table + "\n")
    html = _write_html(root, results, table)
    print(f"report: {html}   ({time.perf_counter() - t0:.0f} s in all)")
    return results


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
    rows.append(
        "| wall time | | | " + " | ".join(f"{results[n]['seconds']:.0f} s" for n in names) + " |"
    )
    return "\n".join(rows) + (
        f"\n\nLoss / exact-match accuracy on held-out examples. A constraint "
        f"is kept when its loss ends at most {TOLERANCE} nats above the "
        "base model's."
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
        for n in results
    )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mixtune demo</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
        "img{max-width:49%}</style></head><body><h1>mixtune demo</h1>"
        "<p>Targets: code, word_problems. Constraints: trivia, safety, dialogue (kept = loss "
        f"at most {TOLERANCE} nats above the base model's). Loss / exact-match accuracy on "
        "held-out examples.</p><table>"
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
