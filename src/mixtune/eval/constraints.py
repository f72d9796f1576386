"""Constraints on evaluation domains, and the best feasible checkpoint of a run.

Every evaluation domain has a ``role`` (target | constraint | monitor), a ``metric`` (loss |
accuracy) and a ``reference`` (a number, or null = the base model's value at step 0). Internally
every metric is *loss-like* (lower is better): a loss as is, an accuracy as −accuracy, so
"accuracy >= reference" and "loss <= reference" are the same test ``value <= reference``.
References and violations are reported in the domain's own metric.

The run's answer, as in DynaMiCS (Gualdoni et al. 2026): among the evaluated steps after 0
whose every constraint is at or under its reference and whose summed target value is below the
base model's, the one with the lowest summed target value; if there is none, keep the base
model. The weights of the step that wins are kept by :mod:`mixtune.engine.answer`, which writes
it to the run's ``final/``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mixtune.errors import MixtuneError

TOL = 1e-12  # a value this far over its reference still counts as at the reference


def loss_like(metrics: dict, metric: str, name: str = "?") -> float:
    """The lower-is-better value of one domain's metrics ({"loss": .., "accuracy": ..})."""
    key = "accuracy" if metric == "accuracy" else "loss"
    if key not in metrics:
        raise MixtuneError(f"evals.{name}: metric '{metric}' but no {key} was evaluated")
    value = float(metrics[key])
    return -value if metric == "accuracy" else value


def native(value: float, metric: str) -> float:
    """Back from loss-like to the domain's metric."""
    return -value if metric == "accuracy" else value


@dataclass(frozen=True)
class Violation:
    domain: str
    metric: str
    value: float  # in the domain's metric
    reference: float  # in the domain's metric
    excess: float  # how far past the reference (> 0), in loss-like units


class Constraints:
    """The target and constraint domains of a run with their references (native units)."""

    def __init__(self, domains: Sequence, references: dict[str, float]):
        self.metric = {d.name: d.metric for d in domains}
        self.targets = [d.name for d in domains if d.role == "target"]
        self.constraints = [d.name for d in domains if d.role == "constraint"]
        missing = [n for n in self.constraints if n not in references]
        if missing:
            raise MixtuneError(f"constraints {missing} have no reference")
        self.references = {n: float(references[n]) for n in self.constraints}

    @classmethod
    def from_step0(cls, domains: Sequence, step0: dict | None) -> Constraints:
        """References from the config, or measured on the base model (the step-0 evaluation)."""
        refs = {}
        for d in domains:
            if d.role != "constraint":
                continue
            if d.reference is not None:
                refs[d.name] = float(d.reference)
            elif step0 is None or d.name not in step0:
                raise MixtuneError(
                    f"evals.{d.name}: reference is null but the base model was "
                    "not evaluated at step 0"
                )
            else:
                refs[d.name] = native(loss_like(step0[d.name], d.metric, d.name), d.metric)
        return cls(domains, refs)

    def ref_loss_like(self, name: str) -> float:
        return native(self.references[name], self.metric[name])

    def value(self, metrics: dict, name: str) -> float:
        return loss_like(metrics[name], self.metric[name], name)

    def check(self, metrics: dict, tol: float = TOL) -> list[Violation]:
        """Constraints whose value is past their reference (empty list: feasible)."""
        out = []
        for n in self.constraints:
            excess = self.value(metrics, n) - self.ref_loss_like(n)
            if excess > tol:
                out.append(
                    Violation(
                        n,
                        self.metric[n],
                        native(self.value(metrics, n), self.metric[n]),
                        self.references[n],
                        excess,
                    )
                )
        return out

    def max_excess(self, metrics: dict) -> float:
        """Largest value − reference over the constraints (loss-like; <= 0 when feasible)."""
        return max(
            (self.value(metrics, n) - self.ref_loss_like(n) for n in self.constraints),
            default=-math.inf,
        )

    def target_value(self, metrics: dict) -> float:
        """Summed loss-like value of the targets (0 without targets)."""
        return sum(self.value(metrics, n) for n in self.targets)


def select_best_feasible(
    records: Iterable[dict],
    domains: Sequence,
    references: dict[str, float] | None = None,
    steps: Iterable[int] | None = None,
) -> dict:
    """The best feasible evaluated step of a run's metrics records (see the module docstring).

    Args:
        records: metrics.jsonl records; those with an ``eval`` section are candidates.
        domains: objects with ``name, role, metric, reference`` (config, DomainInfo, ...).
        references: constraint references in native units; None = config values, else step 0.
        steps: restrict the candidates to these steps (e.g. the saved checkpoints).

    Returns ``{"step", "feasible", "keep_base_model", "target_loss", "target_reduction",
    "target_ppl_reduction", "targets", "max_excess", "n_feasible", "n_evaluated"}``; without a
    feasible step, ``step`` is 0, ``keep_base_model`` true, and ``least_violating`` names the
    evaluated step with the smallest largest excess.
    """
    evals = {r["step"]: r["eval"] for r in records if r.get("eval")}
    if 0 not in evals:
        raise MixtuneError("no step-0 evaluation in the metrics: cannot judge constraints")
    base = evals[0]
    cons = (
        Constraints.from_step0(domains, base)
        if references is None
        else Constraints(domains, references)
    )
    allowed = None if steps is None else set(steps)
    cands = [s for s in sorted(evals) if s > 0 and (allowed is None or s in allowed)]
    t0 = cons.target_value(base)
    feasible = [
        s
        for s in cands
        if not cons.check(evals[s]) and (not cons.targets or cons.target_value(evals[s]) < t0)
    ]
    out = {"n_feasible": len(feasible), "n_evaluated": len(cands), "references": cons.references}
    if not feasible:
        out.update(
            step=0,
            feasible=False,
            keep_base_model=True,
            target_loss=t0,
            target_reduction=0.0,
            target_ppl_reduction=0.0,
        )
        if cands:
            worst = min(cands, key=lambda s: cons.max_excess(evals[s]))
            out["least_violating"] = {"step": worst, "max_excess": cons.max_excess(evals[worst])}
        return out
    # Lowest summed target value (ties: the earliest); without targets, the latest step.
    best = (
        min(feasible, key=lambda s: (cons.target_value(evals[s]), s))
        if cons.targets
        else feasible[-1]
    )
    m = evals[best]
    t = cons.target_value(m)
    n_t = max(len(cons.targets), 1)
    out.update(
        step=best,
        feasible=True,
        keep_base_model=False,
        target_loss=t,
        target_reduction=(t0 - t) / abs(t0) if t0 else 0.0,
        # geometric mean of the targets' perplexities (meaningful for loss targets)
        target_ppl_reduction=1.0 - math.exp((t - t0) / n_t),
        targets={n: cons.value(m, n) for n in cons.targets},
        max_excess=cons.max_excess(m),
    )
    return out


def domain_results(
    step_eval: dict, domains: Sequence, references: dict[str, float]
) -> dict[str, dict]:
    """Each domain's value at one evaluated step against its reference (``selection.json``'s
    ``domains``): ``role``, ``metric``, ``value`` (in its metric); for constraints also
    ``reference``, ``slack`` (how far inside the reference, in the domain's metric: >= 0 kept,
    < 0 broken by that much) and ``kept``; null for the other roles.

    Args:
        step_eval: the ``eval`` section of one metrics record.
        domains: objects with ``name, role, metric`` (test twins included, if wanted).
        references: constraint references in native units (``select_best_feasible``'s).
    """
    out = {}
    for d in domains:
        if d.name not in step_eval:
            continue
        try:
            value = loss_like(step_eval[d.name], d.metric, d.name)
        except MixtuneError:  # (a monitor whose metric was not evaluated)
            continue
        ref = references.get(d.name) if d.role == "constraint" else None
        slack = None if ref is None else native(ref, d.metric) - value
        out[d.name] = {
            "role": d.role,
            "metric": d.metric,
            "value": native(value, d.metric),
            "reference": ref,
            "slack": slack,
            "kept": None if slack is None else slack >= -TOL,
        }
    return out


def best_feasible_for_run(run_dir: str | Path, domains: Sequence) -> dict | None:
    """``select_best_feasible`` on a run directory, with the checkpoint path when it was kept
    (None when no domain is a target or a constraint)."""
    if not any(d.role in ("target", "constraint") for d in domains):
        return None
    from mixtune.engine.rundir import read_metrics

    run_dir = Path(run_dir)
    try:
        best = select_best_feasible(read_metrics(run_dir), domains)
    except MixtuneError as e:  # never fail a finished run over its summary
        return {"error": str(e)}
    ckpt = run_dir / "checkpoints" / f"step-{best['step']:06d}"
    best["checkpoint"] = str(ckpt) if best["feasible"] and ckpt.is_dir() else None
    return best
