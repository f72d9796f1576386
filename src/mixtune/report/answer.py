"""The answer of a constrained run, as the report and the demo show it.

A run with target or constraint domains hands over one model: the best feasible evaluated
step, or the base model when no step kept every constraint (DynaMiCS's rule,
:func:`mixtune.eval.constraints.select_best_feasible`). This module reads what the run wrote
about that choice — ``final/selection.json`` when the run has one, else ``summary.json``'s
``best_feasible`` — and lines it up with the evaluations in ``metrics.jsonl``: per domain its
role, the base model's value (step 0), the answer's, the last step's, the reference, and
whether the answer (and the last step) kept it. It only reads; it never chooses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mixtune.eval.constraints import TOL, loss_like


@dataclass(frozen=True)
class DomainRow:
    name: str
    role: str
    metric: str  # "loss" | "accuracy": the unit of every value on this row
    base: float | None
    answer: float | None
    last: float | None
    reference: float | None = None
    kept: bool | None = None  # the answer at or under its reference (constraints only)
    last_kept: bool | None = None  # the same for the last step


@dataclass(frozen=True)
class Answer:
    step: int | None  # None: the base model is kept
    last_step: int
    source: str  # "checkpoint" | "base" | "last"
    path: str | None  # the model to use (None: the chosen step was not saved)
    rule: str
    rows: list[DomainRow] = field(default_factory=list)

    @property
    def constraints(self) -> list[DomainRow]:
        return [r for r in self.rows if r.role == "constraint"]

    @property
    def held(self) -> list[str]:
        return [r.name for r in self.constraints if r.kept]

    @property
    def target_gain(self) -> float:
        """Summed loss-like target value, base minus answer (> 0: the targets improved)."""
        rows = [r for r in self.rows if r.role == "target" and None not in (r.base, r.answer)]
        return sum(
            loss_like({r.metric: r.base}, r.metric) - loss_like({r.metric: r.answer}, r.metric)
            for r in rows
        )

    def headline(self) -> str:
        """One line: the chosen step, the constraints held, the target gain, the model path."""
        cons = self.constraints
        what = (
            "no evaluated step kept every constraint: keep the base model"
            if self.step is None
            else f"step {self.step} of {self.last_step}"
        )
        held = f"{len(self.held)}/{len(cons)} constraints held" if cons else "no constraints"
        gain = (
            "targets as the base model"
            if self.step is None
            else f"summed target loss {-self.target_gain:+.3f} from the base model"
        )
        path = self.path or "not saved (set train.save_every = eval_every)"
        return f"{what}; {held}; {gain}; model: {path}"


def domains_of(run: Path) -> dict[str, dict]:
    """``{name: {"role", "metric", "reference"}}`` from the run's saved config.yaml."""
    path = run / "config.yaml"
    raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    evals = raw.get("evals") if isinstance(raw, dict) else None
    return {
        e["name"]: {
            "role": e.get("role", "monitor"),
            "metric": e.get("metric", "loss"),
            "reference": e.get("reference"),
        }
        for e in evals or []
        if isinstance(e, dict) and isinstance(e.get("name"), str)
    }


def read_answer(run: str | Path, records: list[dict], summary: dict | None) -> Answer | None:
    """The run's answer, or None when it has no target or constraint domain, no evaluation at
    step 0, or no record of a choice (a run that has not finished)."""
    run = Path(run)
    doms = domains_of(run)
    if not any(d["role"] in ("target", "constraint") for d in doms.values()):
        return None
    evals = {r["step"]: r["eval"] for r in records if r.get("eval")}
    if 0 not in evals:
        return None
    last_step = max(evals)
    selection = _load_json(run / "final" / "selection.json")
    best = (summary or {}).get("best_feasible")
    if isinstance(selection, dict):
        step, source = selection.get("step"), selection.get("source", "checkpoint")
        path = selection.get("path") or str(run / "final")
        rule = selection.get("rule", "best_feasible")
        chosen = selection.get("domains") or {}
    elif isinstance(best, dict) and "step" in best:
        keep_base = bool(best.get("keep_base_model"))
        step = None if keep_base else best["step"]
        source = "base" if keep_base else "checkpoint"
        path = _base_model(run) if keep_base else best.get("checkpoint")
        rule = "best_feasible"
        refs = best.get("references") or {}
        chosen = {n: {"reference": v} for n, v in refs.items()}
    else:
        return None
    answer_eval = evals.get(0 if step is None else step, {})
    rows = []
    for name, d in doms.items():
        if d["role"] == "test":
            continue
        metric, sel = d["metric"], chosen.get(name) or {}
        base, ans, last = (
            _value(e.get(name), metric) for e in (evals[0], answer_eval, evals[last_step])
        )
        if "value" in sel and sel["value"] is not None:
            ans = float(sel["value"])
        ref = sel.get("reference")
        if ref is None and d["role"] == "constraint":
            ref = d["reference"] if d["reference"] is not None else base
        kept = last_kept = None
        if d["role"] == "constraint" and ref is not None:
            kept = sel["kept"] if isinstance(sel.get("kept"), bool) else _within(ans, ref, metric)
            last_kept = _within(last, ref, metric)
        rows.append(DomainRow(name, d["role"], metric, base, ans, last, ref, kept, last_kept))
    return Answer(step, last_step, source, path, rule, rows)


def _value(metrics: dict | None, metric: str) -> float | None:
    key = "accuracy" if metric == "accuracy" else "loss"
    v = (metrics or {}).get(key)
    return None if v is None else float(v)


def _within(value: float | None, reference: float, metric: str) -> bool | None:
    """Whether ``value`` is at or under (accuracy: at or over) ``reference``."""
    if value is None:
        return None
    return loss_like({metric: value}, metric) <= loss_like({metric: reference}, metric) + TOL


def _base_model(run: Path) -> str | None:
    """The base model the run started from (its config's ``model.name_or_path``)."""
    path = run / "config.yaml"
    raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    model = raw.get("model") if isinstance(raw, dict) else None
    return model.get("name_or_path") if isinstance(model, dict) else None


def _load_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None
