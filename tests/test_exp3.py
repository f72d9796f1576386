"""EXP3 online data mixing: the update rule against a naive reference, warm-up, unobserved
arms, and a real run where it moves toward the dataset with the higher training loss."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from conftest import write_jsonl
from mixtune import config
from mixtune.config import MethodConfig
from mixtune.engine.loop import Trainer
from mixtune.engine.rundir import read_metrics
from mixtune.errors import ConfigError
from mixtune.mixers import DatasetInfo, MixContext
from mixtune.mixers.exp3 import EXP3, exploration
from mixtune.registry import MIXERS

DATASETS = [DatasetInfo("a", 300, 3000), DatasetInfo("b", 100, 1000), DatasetInfo("c", 100, 500)]


def _mixer(**options) -> EXP3:
    opts = MIXERS.options(MethodConfig("exp3", options), "mixer")
    return EXP3(opts, list(DATASETS), [], 0)


def _ctx(step, weights, losses, logged=None, max_steps=1000) -> MixContext:
    logged = {} if logged is None else logged
    return MixContext(
        step=step,
        max_steps=max_steps,
        datasets=list(DATASETS),
        domains=[],
        weights=np.asarray(weights, float),
        train_losses=losses,
        evaluate=None,
        probe=None,
        lookahead=None,
        log=logged.__setitem__,
    )


def test_exploration_rate():
    assert exploration(0, 3) == pytest.approx(1 / 3)
    assert exploration(1, 3) == pytest.approx(1 / 3)  # capped at 1/K early on
    assert exploration(100, 3) == pytest.approx(math.sqrt(math.log(3) / 300))


def test_updates_follow_the_rule_by_hand():
    m = _mixer(alpha=0.8, warmup_steps=0, update_every=10)
    w0 = m.propose(_ctx(0, [1 / 3] * 3, {}))
    assert w0 == pytest.approx([1 / 3] * 3)  # eps_0 = 1/K: (1 - K/K) * ... + 1/K
    r, prev, w = [0.0, 0.0, 0.0], 1 / 3, list(w0)
    history = [
        (10, {"a": 2.0, "b": 3.0, "c": 1.0}),
        (20, {"a": 1.5, "b": 2.5}),
        (30, {"a": 1.0, "b": 2.0, "c": 0.8}),
    ]
    for step, losses in history:
        logged: dict = {}
        got = m.propose(_ctx(step, w, losses, logged))
        for i, name in enumerate("abc"):  # naive reference, one arm at a time
            if name in losses:
                r[i] = 0.8 * r[i] + 0.2 * losses[name] / w[i]
        eps = min(1 / 3, math.sqrt(math.log(3) / (3 * step)))
        num = [math.exp(prev * x) for x in r]
        expected = [(1 - 3 * eps) * n / sum(num) + eps for n in num]
        assert got == pytest.approx(expected, rel=1e-12)
        assert list(logged["reward_estimate"].values()) == pytest.approx(r)
        assert logged["eps"] == pytest.approx(eps)
        prev, w = eps, list(got)
    assert len(set(np.round(w, 6))) == 3  # the three arms ended up apart


def test_warmup_keeps_the_prior_while_learning():
    m = _mixer(warmup_steps=20, update_every=10)
    prior = np.array([0.6, 0.2, 0.2])
    assert m.propose(_ctx(0, prior, {})) == pytest.approx(prior)
    w = m.propose(_ctx(10, prior, {"a": 1.0, "b": 1.0, "c": 4.0}))
    assert w == pytest.approx(prior)  # still warming up ...
    assert m.r[2] > m.r[0] > 0  # ... but the estimates already moved
    w = m.propose(_ctx(20, prior, {"a": 1.0, "b": 1.0, "c": 4.0}))
    assert w[2] > w[1] and w[2] > 1 / 3  # the high-loss dataset gains weight
    assert min(w) >= exploration(20, 3) - 1e-12  # the exploration floor
    default = _mixer()  # 2% of max_steps
    assert default.propose(_ctx(10, prior, {"c": 9.0}, max_steps=1000)) == pytest.approx(prior)
    assert not np.allclose(default.propose(_ctx(20, prior, {"c": 9.0}, max_steps=1000)), prior)


def test_an_arm_not_drawn_keeps_its_estimate_and_importance_weighting_is_optional():
    m = _mixer(warmup_steps=0)
    m.propose(_ctx(10, [0.5, 0.25, 0.25], {"a": 1.0, "b": 1.0}))
    assert m.r[2] == 0.0 and m.r[1] == pytest.approx(2 * m.r[0])  # 1/pi: b was rarer
    plain = _mixer(warmup_steps=0, importance_weighting=False)
    plain.propose(_ctx(10, [0.5, 0.25, 0.25], {"a": 1.0, "b": 1.0}))
    assert plain.r[1] == pytest.approx(plain.r[0])


def test_options_are_validated():
    for bad, field in [
        ({"update_every": 0}, "mixer.update_every"),
        ({"alpha": 1}, "mixer.alpha"),
        ({"warmup_steps": -1}, "mixer.warmup_steps"),
        ({"prior": "size"}, "mixer.prior"),
    ]:
        with pytest.raises(ConfigError, match=field):
            _mixer(**bad)
    assert _mixer(prior="tokens").prior == pytest.approx([2 / 3, 2 / 9, 1 / 9])
    assert _mixer().update_steps(35) == [0, 10, 20, 30]


def test_real_run_moves_toward_the_higher_loss_dataset(make_config, data_dir):
    rng = random.Random(3)
    chars = [chr(c) for c in range(33, 127)]
    write_jsonl(
        data_dir / "noise.jsonl",
        [
            {"prompt": "noise:", "response": "".join(rng.choice(chars) for _ in range(6))}
            for _ in range(200)
        ],
    )
    raw = make_config(max_steps=24, mixer={"name": "exp3", "update_every": 2, "alpha": 0.5})
    raw["datasets"] = [
        {"name": "add", "path": str(data_dir / "add.jsonl")},
        {"name": "noise", "path": str(data_dir / "noise.jsonl")},
    ]
    raw["evals"] = []
    raw["train"].update(eval_every=0, log_every=2, schedule="constant")
    Trainer(config.load(data=raw)).run()
    records = [r for r in read_metrics(raw["output_dir"]) if "mixer" in r]
    assert [r["step"] for r in records] == list(range(0, 24, 2))
    for r in records[1:]:
        m = r["mixer"]
        assert m["loss"]["noise"] > m["loss"]["add"]  # the noise stays harder to fit
        assert r["weights"] == pytest.approx(m["p"])
        assert min(m["p"].values()) >= m["eps"] - 1e-12
    # EXP3 chases the loss, noise included (slowly: eps_t * R is small this early).
    noise = [r["weights"]["noise"] for r in records]
    assert sum(b > a for a, b in zip(noise, noise[1:])) >= 0.8 * (len(noise) - 1)
    assert noise[-1] > 0.52
