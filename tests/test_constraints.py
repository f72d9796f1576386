"""Constraint references, checks and the best feasible checkpoint of a run."""

import json

import pytest

from mixtune.errors import MixtuneError
from mixtune.eval.constraints import (
    Constraints,
    best_feasible_for_run,
    loss_like,
    native,
    select_best_feasible,
)
from mixtune.mixers import DomainInfo

DOMAINS = [
    DomainInfo("math", "target", "loss", None),
    DomainInfo("code", "target", "loss", None),
    DomainInfo("safety", "constraint", "accuracy", None),  # accuracy must not drop
    DomainInfo("trivia", "constraint", "loss", 2.5),  # a given reference
    DomainInfo("chat", "monitor", "loss", None),
]


def ev(math, code, safety, trivia, chat=3.0):
    return {
        "math": {"loss": math},
        "code": {"loss": code},
        "safety": {"loss": 1.0, "accuracy": safety},
        "trivia": {"loss": trivia},
        "chat": {"loss": chat},
    }


BASE = ev(2.0, 3.0, 0.8, 2.4)


def test_loss_like_turns_accuracy_into_minus_accuracy():
    assert loss_like({"loss": 1.5, "accuracy": 0.7}, "loss") == 1.5
    assert loss_like({"loss": 1.5, "accuracy": 0.7}, "accuracy") == -0.7
    assert native(-0.7, "accuracy") == 0.7 and native(1.5, "loss") == 1.5
    with pytest.raises(MixtuneError, match="evals.x: metric 'accuracy' but no accuracy"):
        loss_like({"loss": 1.0}, "accuracy", "x")


def test_references_from_step_zero_or_config():
    cons = Constraints.from_step0(DOMAINS, BASE)
    assert cons.references == {"safety": 0.8, "trivia": 2.5}  # measured / given
    assert cons.targets == ["math", "code"] and cons.constraints == ["safety", "trivia"]
    assert cons.ref_loss_like("safety") == -0.8
    with pytest.raises(MixtuneError, match="safety: reference is null"):
        Constraints.from_step0(DOMAINS, None)


def test_check_reports_violations_in_the_domain_metric():
    cons = Constraints.from_step0(DOMAINS, BASE)
    assert cons.check(ev(1.0, 1.0, 0.8, 2.5)) == []  # exactly at both references: feasible
    assert cons.check(ev(1.0, 1.0, 0.9, 1.0, chat=99.0)) == []  # monitors never violate
    (v,) = cons.check(ev(1.0, 1.0, 0.75, 2.0))
    assert (v.domain, v.metric, v.value, v.reference) == ("safety", "accuracy", 0.75, 0.8)
    assert v.excess == pytest.approx(0.05)
    names = [v.domain for v in cons.check(ev(1.0, 1.0, 0.7, 2.6))]
    assert names == ["safety", "trivia"]
    assert cons.max_excess(ev(1.0, 1.0, 0.9, 2.0)) == pytest.approx(-0.1)
    assert cons.target_value(ev(1.0, 1.5, 0.9, 2.0)) == 2.5


def records(*evals):
    return [{"step": s, "eval": e} for s, e in evals] + [{"step": 5, "train": {"loss": 1.0}}]


def test_best_feasible_is_the_lowest_target_among_feasible_steps():
    recs = records(
        (0, BASE),
        (10, ev(1.8, 2.9, 0.8, 2.4)),
        (20, ev(1.0, 2.0, 0.7, 2.4)),
        (30, ev(1.7, 2.7, 0.85, 2.5)),
        (40, ev(1.9, 2.7, 0.9, 2.0)),
    )
    best = select_best_feasible(recs, DOMAINS)
    assert best["step"] == 30 and best["feasible"] and not best["keep_base_model"]
    assert best["target_loss"] == pytest.approx(4.4)
    assert best["target_reduction"] == pytest.approx(0.6 / 5.0)
    assert best["target_ppl_reduction"] == pytest.approx(1 - 2.718281828 ** (-0.3))
    assert best["n_feasible"] == 3 and best["n_evaluated"] == 4
    # only the saved checkpoints can be loaded back
    assert select_best_feasible(recs, DOMAINS, steps=[10, 20, 40])["step"] == 40


def test_no_feasible_step_keeps_the_base_model():
    recs = records(
        (0, BASE),
        (10, ev(1.5, 2.5, 0.7, 2.4)),
        (20, ev(1.0, 2.0, 0.79, 2.6)),
        (30, ev(2.1, 3.0, 0.9, 2.0)),
    )  # the last keeps every constraint but no gain
    best = select_best_feasible(recs, DOMAINS)
    assert best["step"] == 0 and best["keep_base_model"] and not best["feasible"]
    assert best["target_ppl_reduction"] == 0.0
    assert best["least_violating"]["step"] == 30


def test_explicit_references_override_the_base_model():
    recs = records((0, BASE), (10, ev(1.5, 2.5, 0.7, 2.4)))
    assert not select_best_feasible(recs, DOMAINS)["feasible"]
    best = select_best_feasible(recs, DOMAINS, references={"safety": 0.6, "trivia": 2.5})
    assert best["feasible"] and best["step"] == 10


def test_missing_step_zero_is_an_error():
    with pytest.raises(MixtuneError, match="no step-0 evaluation"):
        select_best_feasible([{"step": 10, "eval": BASE}], DOMAINS)


def test_best_feasible_for_run_names_the_kept_checkpoint(tmp_path):
    recs = records((0, BASE), (10, ev(1.8, 2.9, 0.8, 2.4)), (20, ev(1.5, 2.5, 0.8, 2.4)))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "checkpoints" / "step-000020").mkdir(parents=True)
    best = best_feasible_for_run(tmp_path, DOMAINS)
    assert best["step"] == 20 and best["checkpoint"].endswith("step-000020")
    (tmp_path / "checkpoints" / "step-000020").rmdir()
    assert best_feasible_for_run(tmp_path, DOMAINS)["checkpoint"] is None
    monitors = [DomainInfo("chat", "monitor", "loss", None)]
    assert best_feasible_for_run(tmp_path, monitors) is None
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3, "eval": BASE}) + "\n")
    assert "no step-0 evaluation" in best_feasible_for_run(tmp_path, DOMAINS)["error"]
