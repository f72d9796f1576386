"""DynamixSFT: the paper's update rule against a naive reference, a known-answer training run
(learnable vs pure-noise data), bit-identical restore around propose(), resume, 2 processes."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from helpers import torchrun
from mixtune import config
from mixtune.config import MethodConfig
from mixtune.engine import probe
from mixtune.engine.checkpoint import rng_state
from mixtune.engine.loop import Trainer
from mixtune.engine.rundir import read_metrics
from mixtune.errors import ConfigError
from mixtune.mixers import DatasetInfo, LookaheadResult, MixContext
from mixtune.mixers.dynamixsft import DynamixSFT, minmax, policy
from mixtune.registry import MIXERS

HERE = Path(__file__).parent
DATASETS = [DatasetInfo("a", 600, 100), DatasetInfo("b", 300, 100), DatasetInfo("c", 100, 800)]


def _mixer(**options) -> DynamixSFT:
    opts = MIXERS.options(MethodConfig("dynamixsft", options), "mixer")
    return DynamixSFT(opts, list(DATASETS), [], 0)


def _ctx(step, lookahead, logged, losses=None) -> MixContext:
    return MixContext(
        step=step,
        max_steps=100,
        datasets=list(DATASETS),
        domains=[],
        weights=np.full(3, 1 / 3),
        train_losses={},
        evaluate=None,
        probe=None,
        lookahead=lookahead,
        log=logged.__setitem__,
        losses=losses,
    )


def test_policy_matches_the_papers_formula_by_hand():
    q, p0, beta, gamma = np.array([0.2, 0.9, 0.4]), np.array([0.6, 0.3, 0.1]), 4.0, 0.3
    num = [math.exp(beta * q[k]) * p0[k] for k in range(3)]
    expected = [(1 - gamma) * n / sum(num) + gamma / 3 for n in num]
    assert policy(q, p0, beta, gamma) == pytest.approx(expected, rel=1e-12)
    # Q = 0 (the start): the prior flattened by the floor.
    assert policy(np.zeros(3), p0, beta, gamma) == pytest.approx(0.7 * p0 + 0.1, rel=1e-12)
    assert policy(np.array([1e4, 0, 0]), p0, beta, gamma)[1] == pytest.approx(0.1)  # no overflow


def test_minmax_and_its_guard():
    assert minmax(np.array([0.1, 0.3, 0.2])) == pytest.approx([0.0, 1.0, 0.5])
    assert minmax(np.array([0.2, 0.2, 0.2])).tolist() == [0.5, 0.5, 0.5]


def test_one_update_follows_the_rule():
    """Rewards, normalisation, EMA of Q and the policy, checked against a naive recomputation."""
    pre = {0: np.array([2.0, 1.0]), 1: np.array([3.0, 3.0]), 2: np.array([1.0, 4.0])}
    post = {0: np.array([1.5, 1.0]), 1: np.array([2.9, 2.7]), 2: np.array([1.0, 4.2])}
    calls = []

    def lookahead(j, optimizer="sgd", batch_size=None, key=None):
        calls.append((j, optimizer, batch_size, key))
        return LookaheadResult(pre[j], post[j], seconds=0.25)

    m = _mixer(optimizer="adam", batch_size=2)
    logged: dict = {}
    first = m.propose(_ctx(0, lookahead, logged))
    assert not calls  # no look-ahead at step 0: Q = 0
    assert first == pytest.approx(0.7 * np.array([0.6, 0.3, 0.1]) + 0.1)
    p = m.propose(_ctx(50, lookahead, logged))
    assert calls == [(0, "adam", 2, 50), (1, "adam", 2, 50), (2, "adam", 2, 50)]
    eps = 1e-8
    raw = [np.mean([(a - b) / (a + eps) for a, b in zip(pre[j], post[j])]) for j in range(3)]
    lo, hi = min(raw), max(raw)
    norm = [(r - lo) / (hi - lo) for r in raw]
    q = [0.05 * n for n in norm]
    assert list(logged["reward"].values()) == pytest.approx(raw)
    assert list(logged["reward_norm"].values()) == pytest.approx(norm)
    assert list(logged["q"].values()) == pytest.approx(q)
    assert p == pytest.approx(policy(np.array(q), np.array([0.6, 0.3, 0.1]), 4.0, 0.3))
    assert list(logged["p"].values()) == pytest.approx(p)
    assert logged["lookahead_seconds_total"] == pytest.approx(0.75)
    assert np.argmax(p - first) == int(np.argmax(raw))  # the best reward gains the most


def test_options_are_validated():
    for bad, field in [
        ({"gamma": 1.5}, "mixer.gamma"),
        ({"alpha": 1.0}, "mixer.alpha"),
        ({"beta": -1}, "mixer.beta"),
        ({"update_every": 0}, "mixer.update_every"),
        ({"optimizer": "lion"}, "mixer.optimizer"),
        ({"reward": "entropy"}, "mixer.reward"),
        ({"prior": {"zzz": 1}}, "mixer.prior"),
    ]:
        with pytest.raises(ConfigError, match=field):
            _mixer(**bad)
    assert _mixer(prior="tokens").p0 == pytest.approx([0.1, 0.1, 0.8])
    assert _mixer(prior={"a": 1, "c": 3}).p0 == pytest.approx([0.25, 0.0, 0.75])
    assert _mixer(update_every=30).update_steps(100) == [0, 30, 60, 90]


# ----------------------------------------------------------------------------------------------
# Real runs on a tiny model: addition (learnable) against random byte strings (pure noise).


def _noise_records(n: int, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    chars = [chr(c) for c in range(33, 127)]
    return [
        {
            "prompt": "noise:",
            "response": "".join(rng.choice(chars) for _ in range(rng.randint(4, 8))),
        }
        for _ in range(n)
    ]


@pytest.fixture
def noisy_config(make_config, data_dir):
    write_jsonl(data_dir / "noise.jsonl", _noise_records(200))

    def make(**mixer):
        raw = make_config(max_steps=24, mixer={"name": "dynamixsft", "update_every": 3, **mixer})
        raw["datasets"] = [
            {"name": "add", "path": str(data_dir / "add.jsonl")},
            {"name": "noise", "path": str(data_dir / "noise.jsonl")},
        ]
        raw["evals"] = []
        raw["train"].update(eval_every=0, log_every=3, schedule="constant")
        return raw

    return make


@pytest.mark.parametrize("mixer", [{}, {"reward": "progress"}], ids=["lookahead-sgd", "progress"])
def test_moves_toward_the_learnable_dataset_and_keeps_the_floor(noisy_config, mixer):
    raw = noisy_config(**mixer)
    Trainer(config.load(data=raw)).run()
    records = [r for r in read_metrics(raw["output_dir"]) if "mixer" in r]
    assert [r["step"] for r in records] == list(range(0, 24, 3))
    gamma, K = 0.3, 2
    for r in records:
        p = r["mixer"]["p"]
        assert min(p.values()) >= gamma / K - 1e-12  # the floor, at every update
        assert r["weights"] == pytest.approx(p)  # the sampler uses exactly the policy
    first, last = records[0]["weights"], records[-1]["weights"]
    assert first["add"] == pytest.approx(0.5)  # equal sizes: p0 = 1/2, Q = 0
    assert last["add"] > 0.65 > last["noise"] + 0.3
    rewards = [r["mixer"]["reward"] for r in records if "reward" in r["mixer"]]
    assert sum(x["add"] > x["noise"] for x in rewards) >= 0.8 * len(rewards)


def _state(t):
    opt = probe.unwrap_optimizer(t.optimizer)
    return {
        "params": [p.detach().clone() for p in t.params],
        "opt": [
            {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
            for p in t.params
            if p in opt.state
        ],
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "sched": copy.deepcopy(t.scheduler.state_dict()),
        "rng": rng_state(),
        "sampler": copy.deepcopy(t.sampler.state_dict()),
    }


@pytest.mark.parametrize(
    "mixer",
    [{"optimizer": "sgd"}, {"optimizer": "adam"}, {"reward": "progress"}],
    ids=["sgd", "adam", "progress"],
)
def test_propose_leaves_the_run_bit_identical(make_config, mixer):
    raw = make_config(max_steps=10, mixer={"name": "dynamixsft", "update_every": 2, **mixer})
    raw["train"].update(eval_every=0)
    t = Trainer(config.load(data=raw))
    for _ in range(2):  # optimizer state first
        t.train_step(*t.sampler.next_batch(8))
        t.step += 1
    for step in (2, 4):  # the second call of `progress` also re-scores the earlier batch
        t.step = step
        before = _state(t)
        logged: dict = {}
        ctx = MixContext(
            step=step,
            max_steps=10,
            datasets=t.infos,
            domains=t.dom_infos,
            weights=t.sampler.weights.copy(),
            train_losses={},
            evaluate=t.evaluate,
            probe=partial(probe.probe, t.state),
            lookahead=partial(probe.lookahead, t.state),
            log=logged.__setitem__,
            losses=partial(probe.example_losses, t.state),
        )
        t.mixer.propose(ctx)
        after = _state(t)
        assert logged["loss_pre"]
        for a, b in zip(before["params"], after["params"]):
            assert torch.equal(a, b)
        assert len(before["opt"]) == len(after["opt"]) > 0
        for sa, sb in zip(before["opt"], after["opt"]):
            assert sa.keys() == sb.keys()
            assert all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa)
        assert before["groups"] == after["groups"] and before["sched"] == after["sched"]
        assert before["sampler"] == after["sampler"]
        assert torch.equal(before["rng"]["torch"], after["rng"]["torch"])
        assert before["rng"]["python"] == after["rng"]["python"]
        assert all(
            np.array_equal(x, y) for x, y in zip(before["rng"]["numpy"], after["rng"]["numpy"])
        )


def test_forward_only_losses_score_the_lookahead_batch(make_config):
    raw = make_config(max_steps=4)
    t = Trainer(config.load(data=raw))
    t.train_step(*t.sampler.next_batch(8))
    for j in (0, 1):
        ahead = probe.lookahead(t.state, j, key=7, batch_size=6)
        np.testing.assert_allclose(
            probe.example_losses(t.state, j, key=7, batch_size=6), ahead.pre, rtol=1e-5
        )
    assert not np.allclose(
        probe.example_losses(t.state, 0, key=7), probe.example_losses(t.state, 0, key=8)
    )


def test_resume_repeats_the_uninterrupted_run(make_config, tmp_path):
    raw = make_config(
        max_steps=9, mixer={"name": "dynamixsft", "update_every": 2, "reward": "progress"}
    )
    raw["train"].update(eval_every=0, log_every=1)
    full = Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/full"]))
    full.run()
    Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/split"])).run(stop_after=5)
    Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/split"])).run()
    strip = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(tmp_path / "full")]
    again = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(tmp_path / "split")]
    assert len({r["weights"]["add"] for r in strip}) > 2  # the weights did move
    assert [r.get("mixer") for r in strip] == [r.get("mixer") for r in again]
    assert [r["weights"] for r in strip] == [r["weights"] for r in again]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("reward", ["lookahead", "progress"])
def test_two_processes_hold_the_same_policy(noisy_config, tmp_path, reward):
    """Both ranks compute the same Q and p (per-example losses are gathered over ranks)."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not available")
    raw = noisy_config(reward=reward)
    raw["max_steps"] = 10
    raw["train"].update(batch_size=8, micro_batch_size=2)
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    proc = torchrun(HERE / "dist_worker.py", tmp_path / "cfg.json", tmp_path / "out.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out.json").read_text())
    rank0, rank1 = res["updates"]
    assert rank0 and rank0 == rank1 and res["params_in_sync"]
    records = [r for r in read_metrics(raw["output_dir"]) if "reward" in r.get("mixer", {})]
    assert records and records[-1]["weights"]["add"] > 0.5
