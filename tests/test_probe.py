"""Probe and look-ahead must leave model, optimizer, scheduler, RNG and sampler bit-identical."""

import copy

import numpy as np
import pytest
import torch

from mixtune import config
from mixtune.engine import probe
from mixtune.engine.checkpoint import rng_state
from mixtune.engine.loop import Trainer


def _everything(t):
    opt = probe._inner(t.optimizer)
    return {
        "params": [p.detach().clone() for p in t.params],
        "opt": {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
                for i, p in enumerate(t.params) if p in opt.state},
        "lr": [g["lr"] for g in opt.param_groups],
        "sched": copy.deepcopy(t.scheduler.state_dict()),
        "rng": rng_state(),
        "sampler": copy.deepcopy(t.sampler.state_dict()),
    }


def _assert_identical(a, b):
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x, y)
    assert a["opt"].keys() == b["opt"].keys()
    for i in a["opt"]:
        for k in a["opt"][i]:
            assert torch.equal(torch.as_tensor(a["opt"][i][k]), torch.as_tensor(b["opt"][i][k]))
    assert a["lr"] == b["lr"] and a["sched"] == b["sched"] and a["sampler"] == b["sampler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["rng"]["python"] == b["rng"]["python"]
    assert all(np.array_equal(x, y) for x, y in zip(a["rng"]["numpy"], b["rng"]["numpy"]))


@pytest.fixture
def trained(make_config):
    raw = make_config(max_steps=6)
    raw["train"].update(eval_every=0)
    t = Trainer(config.load(data=raw))
    for _ in range(2):  # give the optimizer some state first
        ds, ex = t.sampler.next_batch(8)
        t.train_step(ds, ex)
        t.step += 1
    return t


def test_probe_restores_everything(trained):
    before = _everything(trained)
    now = trained.evaluate(n_batches=1, use_cache=False)
    after_probe = probe.probe(trained, 1, steps=3, n_batches=1)
    assert after_probe["rev"]["loss"] != now["rev"]["loss"]  # the probe really trained
    _assert_identical(before, _everything(trained))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_lookahead_restores_everything(trained, kind):
    before = _everything(trained)
    res = probe.lookahead(trained, 0, optimizer=kind)
    assert res.pre.shape == res.post.shape == (8,)
    assert not np.allclose(res.pre, res.post)  # the virtual step really moved the model
    _assert_identical(before, _everything(trained))


def test_training_after_a_probe_equals_training_without(make_config, tmp_path):
    raw = make_config(max_steps=6)
    raw["train"].update(eval_every=0)

    def run(with_probe):
        t = Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/{with_probe}"]))
        for i in range(4):
            if with_probe and i == 2:
                probe.probe(t, 0, steps=2, n_batches=1)
                probe.lookahead(t, 1, optimizer="adam")
            ds, ex = t.sampler.next_batch(8)
            t.train_step(ds, ex)
        return [p.detach().clone() for p in t.params]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)
