"""Evaluation on exact example sets: per-example scores and standard errors, test-split domains
(role: test), recycled anchors on the probe budget's examples, and noise-aware DynaMiCS."""

import numpy as np
import pytest

from conftest import write_jsonl
from mixtune import config
from mixtune.engine.loop import Trainer
from mixtune.engine.rundir import read_metrics
from mixtune.errors import ConfigError
from mixtune.eval.domains import Scores, loss_se, mean_se
from mixtune.mixers import DatasetInfo, DomainInfo, MixContext
from mixtune.mixers.dynamics.mixer import DynaMiCS, DynaMiCSConfig
from test_dynamics import _records, toy_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_jsonl(root / "tgt.jsonl", _records(150, True, 0))
    write_jsonl(root / "reg.jsonl", _records(150, False, 1))
    return root


def _cfg(data_root, tmp_path, name: str, mixer: dict, steps: int = 24) -> dict:
    return {**toy_config(data_root, name, mixer, steps), "output_dir": str(tmp_path / name)}


def _with_test_split(raw: dict) -> dict:
    raw["evals"].append(
        {
            "name": "reg-test",
            "from_dataset": "reg",
            "holdout": 16,
            "batches": 2,
            "batch_size": 8,
            "role": "test",
            "test_of": "reg",
        }
    )
    return raw


# ---------------------------------------------------------------------------------------------
# Standard errors


def test_loss_se_is_the_ratio_estimators_standard_error():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 30, 400).astype(float)
    nll = tokens * rng.gamma(2.0, 1.0, 400)
    L = nll.sum() / tokens.sum()
    # delta method: Var(Σa/Σb) ≈ n/(n−1) Σ (a_i − L b_i)² / (Σb)²
    want = np.sqrt(400 / 399 * ((nll - L * tokens) ** 2).sum()) / tokens.sum()
    assert loss_se(nll, tokens) == pytest.approx(want, rel=1e-12)
    # ... which is what the spread of the loss over resampled example sets shows
    boot = [
        (nll[i].sum() / tokens[i].sum()) for i in (rng.integers(0, 400, 400) for _ in range(2000))
    ]
    assert loss_se(nll, tokens) == pytest.approx(np.std(boot), rel=0.1)
    assert loss_se(3.0 * tokens, tokens) == pytest.approx(0.0, abs=1e-12)  # no spread
    assert np.isnan(loss_se(np.ones(1), np.ones(1)))  # one example: unknown
    hits = np.array([1.0, 0.0, 1.0, 1.0])  # exact match: the plain mean's standard error
    assert mean_se(hits) == pytest.approx(np.sqrt(0.75 / 3) / 2)  # sample var 0.25, n = 4
    assert np.isnan(mean_se(hits[:1]))


def test_every_evaluation_logs_its_standard_error_and_size(data_root, tmp_path):
    raw = _cfg(data_root, tmp_path, "se", {"name": "uniform"}, steps=4)
    Trainer(config.load(data=raw)).run()
    ev = [r["eval"] for r in read_metrics(tmp_path / "se") if "eval" in r]
    for e in ev:
        for m in e.values():
            assert m["n"] == 16 and 0 < m["loss_se"] < m["loss"]
    # the change since step 0, paired over the same examples (from step 0's scores)
    assert all("change_se" not in m for m in ev[0].values())
    for m in ev[-1].values():
        assert 0 < m["change_se"] < np.inf


# ---------------------------------------------------------------------------------------------
# Test-split domains


def test_test_domains_are_logged_but_no_mixer_or_probe_sees_them(data_root, tmp_path):
    mixer = {"name": "dynamics", "schedule": "fixed", "interval": 4}
    raw = _with_test_split(_cfg(data_root, tmp_path, "dyn", mixer, steps=8))
    trainer = Trainer(config.load(data=raw))
    assert [d.name for d in trainer.dom_infos] == ["tgt", "reg"]
    summary = trainer.run()
    recs = read_metrics(tmp_path / "dyn")
    evals = [r["eval"] for r in recs if "eval" in r]
    assert all(set(e) == {"tgt", "reg", "reg-test"} for e in evals)
    # held out apart from reg's own evaluation examples: other examples, other numbers
    assert evals[0]["reg-test"]["loss"] != evals[0]["reg"]["loss"]
    for r in recs:
        if "mixer" in r:
            assert set(r["mixer"]["S"]) == {"tgt", "reg"}
            assert set(r["mixer"]["anchor"]) == {"tgt", "reg"}
    assert set(summary["final_eval"]) == {"tgt", "reg", "reg-test"}
    assert "reg-test" not in summary.get("best_feasible", {}).get("values", {})
    assert set(trainer.evaluate(use_cache=False)) == {"tgt", "reg"}
    assert set(trainer.evaluate(use_cache=False, include_test=True)) == {"tgt", "reg", "reg-test"}
    # the report shows the noise: values ± se, changes ± paired se, the mixer's predictions
    from mixtune.report.html import write_report

    page = write_report(tmp_path / "dyn").read_text()
    assert "change ± paired se" in page and "Predicted constraint changes ± noise" in page
    first = next(r for r in recs if "mixer" in r)
    assert f"{first['eval']['reg']['loss']:.4f} ± {first['eval']['reg']['loss_se']:.4f}" in page


@pytest.mark.parametrize(
    "change, match",
    [
        ({"role": "monitor"}, "role 'test' and test_of go together"),
        ({"test_of": None}, "role 'test' and test_of go together"),
        ({"test_of": "nope"}, "evals.reg-test.test_of: 'nope' is not"),
        ({"test_of": "reg-test"}, "evals.reg-test.test_of"),
        ({"reference": 1.0}, "evals.reg-test.reference: a test domain has no reference"),
    ],
)
def test_test_domain_config_errors(data_root, tmp_path, change, match):
    raw = _with_test_split(_cfg(data_root, tmp_path, "bad", {"name": "uniform"}))
    raw["evals"][-1].update(change)
    with pytest.raises(ConfigError, match=match):
        config.load(data=raw)


# ---------------------------------------------------------------------------------------------
# Recycled anchors see the probes' examples


def test_recycled_evaluation_gives_exactly_the_probe_budgets_numbers(data_root, tmp_path):
    raw = _cfg(data_root, tmp_path, "sub", {"name": "uniform"}, steps=2)
    for e in raw["evals"]:
        e.update(holdout=32, batches=4)
    trainer = Trainer(config.load(data=raw))
    trainer._eval_if_due(force=True)  # the scheduled (full, 4-batch) evaluation of step 0
    full = trainer.eval_cache["result"]
    fresh = trainer.evaluate(2, use_cache=False)
    recycled = trainer.evaluate(2)
    for d in ("tgt", "reg"):
        assert recycled[d] == fresh[d]  # the first 2 batches, bit for bit
        assert recycled[d]["n"] == 16 and full[d]["n"] == 32
        assert recycled[d]["loss"] != full[d]["loss"]
    assert trainer.evaluate() == {d: full[d] for d in ("tgt", "reg")}


def test_dynamics_anchor_and_probes_use_the_same_examples(data_root, tmp_path):
    raw = _cfg(
        data_root,
        tmp_path,
        "anch",
        {"name": "dynamics", "schedule": "fixed", "interval": 4, "probe_batches": 2},
        steps=4,
    )
    for e in raw["evals"]:
        e.update(holdout=32, batches=4)
    base = Trainer(config.load(data={**raw, "output_dir": str(tmp_path / "fresh")}))  # step 0
    want = base.evaluate(2, use_cache=False)
    Trainer(config.load(data=raw)).run()
    rec = read_metrics(tmp_path / "anch")[0]
    assert rec["step"] == 0 and "eval" in rec  # recycled: step 0 is a scheduled evaluation
    for d in ("tgt", "reg"):
        assert rec["mixer"]["anchor"][d] == want[d]["loss"]
        assert rec["mixer"]["anchor"][d] != rec["eval"][d]["loss"]  # not the 4-batch number
        assert rec["mixer"]["anchor_se"][d] == pytest.approx(want[d]["loss_se"], rel=1e-12)
        for j in ("tgt", "reg"):
            assert 0 < rec["mixer"]["S_se"][d][j] < np.inf


# ---------------------------------------------------------------------------------------------
# Noise-aware DynaMiCS on a synthetic problem (no model): dataset A helps the target and raises
# the constraint a little with a noisy per-example effect; dataset B lowers the constraint
# exactly and does nothing to the target.

N, C_STEPS = 50, 4


def _fake_ctx(log: dict) -> MixContext:
    tok = np.ones(N)
    noise = np.where(np.arange(N) % 2, 0.05, -0.05)
    before = {"t": np.full(N, 2.0), "c": np.full(N, 1.0)}
    after = [
        {"t": before["t"] - 0.05 * C_STEPS, "c": before["c"] + 0.001 * C_STEPS + noise},
        {"t": before["t"].copy(), "c": before["c"] - 0.002 * C_STEPS},
    ]

    def result(nll):
        return {
            k: {
                "loss": float(v.mean()),
                "loss_se": loss_se(v, tok),
                "n": N,
                "scores": Scores(v, tok),
            }
            for k, v in nll.items()
        }

    return MixContext(
        step=0,
        max_steps=C_STEPS,
        datasets=[DatasetInfo("A", 100, 1000), DatasetInfo("B", 100, 1000)],
        domains=[
            DomainInfo("t", "target", "loss", None),
            DomainInfo("c", "constraint", "loss", None),
        ],
        weights=np.array([0.5, 0.5]),
        train_losses={},
        evaluate=lambda n_batches=None, **kw: result(before),
        probe=lambda j, steps, n_batches=None, **kw: result(after[j]),
        lookahead=None,
        log=log.__setitem__,
    )


def _mixer(**opts) -> DynaMiCS:
    ctx = _fake_ctx({})
    return DynaMiCS(
        DynaMiCSConfig(schedule="fixed", interval=C_STEPS, c_max=C_STEPS, **opts),
        ctx.datasets,
        ctx.domains,
        0,
    )


def test_slope_standard_errors_are_paired_over_the_probe_examples():
    log = {}
    _mixer().propose(_fake_ctx(log))
    se = log["S_se"]
    assert se["c"]["A"] == pytest.approx(0.05 * np.sqrt(N / (N - 1)) / np.sqrt(N) / C_STEPS)
    assert se["c"]["B"] == pytest.approx(0.0, abs=1e-12)  # the same shift on every example
    assert se["t"]["A"] == pytest.approx(0.0, abs=1e-12)
    assert log["S"]["c"]["A"] == pytest.approx(0.001)


def test_noise_margin_keeps_the_constraint_with_standard_errors_to_spare():
    faithful, cautious = {}, {}
    w0 = _mixer().propose(_fake_ctx(faithful))
    w2 = _mixer(noise_margin=2.0).propose(_fake_ctx(cautious))
    # the paper's rule: nearly as much A as keeps the predicted constraint at its reference
    # (2/3; the penalised solve stops a little short of the bound)
    assert 0.55 < w0[0] <= 2 / 3 + 1e-9
    # two standard errors of A's constraint slope (≈ 0.0018 / step) to spare: far less A
    bound = 0.002 / (0.001 + 2 * cautious["S_se"]["c"]["A"] + 0.002)
    assert 0 < w2[0] <= bound + 1e-9
    assert w2[0] < w0[0] - 0.2
    # the logged prediction stays the central one
    assert cautious["predicted"]["c"] == pytest.approx(
        1.0 + C_STEPS * (0.001 * w2[0] - 0.002 * w2[1])
    )


def test_noise_warning_names_the_constraint_once(caplog):
    m = _mixer()
    L, refs = np.array([2.0, 1.0]), np.array([0.0, 1.0])
    now = {"t": {"n": 32}, "c": {"n": 32}}
    S = np.array([[-0.1, 0.0], [0.01, 0.02]])  # every dataset raises c by 0.04-0.08 over H=4
    log = {}
    ctx = _fake_ctx(log)
    with caplog.at_level("WARNING"):
        m._warn_noise(ctx, now, L, np.array([0.0, 0.012]), S, np.zeros((2, 2)), refs, 4)
        m._warn_noise(ctx, now, L, np.array([0.0, 0.012]), S, np.zeros((2, 2)), refs, 4)
    assert len(log["noise_warnings"]) == 1
    msg = log["noise_warnings"][0]
    assert msg.startswith("c: reference loss 1.000 ± 0.012 on 32 examples; every dataset")
    assert "raise evals.c.batches" in msg and caplog.text.count("every dataset") == 1
    # movements within the probes' noise: the other warning
    log.clear()
    m = _mixer()
    small = np.array([[-0.1, 0.0], [0.001, -0.001]])
    m._warn_noise(ctx, now, L, np.array([0.0, 0.001]), small, np.full((2, 2), 0.01), refs, 4)
    assert "no dataset moves it by more than the probes' noise" in log["noise_warnings"][0]
    # a clear, resolvable constraint: no warning
    log.clear()
    m = _mixer()
    m._warn_noise(ctx, now, L, np.array([0.0, 0.001]), S * [[1], [-1]], np.zeros((2, 2)), refs, 4)
    assert "noise_warnings" not in log
