"""Probe and look-ahead must leave model, optimizer, scheduler, RNG and sampler bit-identical."""

import copy

import numpy as np
import pytest
import torch

from mixtune import config
from mixtune.engine import probe
from mixtune.engine.checkpoint import rng_state
from mixtune.engine.loop import Trainer
from mixtune.losses.core import reduce, sequence_mean, token_losses

# Models with dropout, each kind the look-ahead must find: a layer (peft's LoRA dropout, an
# nn.Dropout) and a functional rate (llama's attention dropout, a float on the module).
DROPOUT = ["lora_dropout", "attention_dropout"]


def _everything(t):
    opt = probe.unwrap_optimizer(t.optimizer)
    return {
        "params": [p.detach().clone() for p in t.params],
        "opt": {
            i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
            for i, p in enumerate(t.params)
            if p in opt.state
        },
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


def _raw(make_config, model: str | None = None) -> dict:
    raw = make_config(max_steps=6)
    raw["train"].update(eval_every=0)
    if model in ("lora", "lora_dropout"):
        raw["model"]["lora"] = {
            "enabled": True,
            "r": 4,
            "alpha": 8,
            "dropout": 0.5 if model == "lora_dropout" else 0.0,
        }
    elif model == "attention_dropout":
        raw["model"]["config"]["attention_dropout"] = 0.5
    return raw


def _trained(make_config, model: str | None = None) -> Trainer:
    t = Trainer(config.load(data=_raw(make_config, model)))
    for _ in range(2):  # optimizer state first; and LoRA's B leaves 0, so its dropout matters
        ds, ex = t.sampler.next_batch(8)
        t.train_step(ds, ex)
        t.step += 1
    return t


@pytest.fixture
def trained(make_config):
    return _trained(make_config)


def _modes(t) -> list[bool]:
    return [m.training for m in t.model.modules()]


def _by_hand(t, kind: str, pre: str | None, grad: str, post: str):
    """The look-ahead on dataset 0 written out, each forward in the mode named ("train" or
    "eval"); ``pre=None`` reads L_pre off the back-propagated forward. (None, "train", "train")
    is the look-ahead as it was before it measured without dropout."""
    ex, batch = probe._reward_batch(t.state, 0, None, None)
    n_tokens = float(t.train_sets[0].label_counts[ex].sum())
    snap = probe.Snapshot(t.state, optimizer=kind == "adam")

    def forward(mode):
        t.model.train(mode == "train")
        logits = t.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        return token_losses(logits, batch["labels"])

    try:
        with t.acc.autocast():
            if pre:
                with torch.no_grad():
                    l_pre = sequence_mean(*forward(pre))
            nll, mask = forward(grad)
            if not pre:
                l_pre = sequence_mean(nll.detach(), mask)
            t.acc.backward(reduce(nll, mask, n_tokens=n_tokens) * t.world)
        if kind == "sgd":
            lr = probe.unwrap_optimizer(t.optimizer).param_groups[0]["lr"]
            with torch.no_grad():
                for p in t.params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-lr)
        else:
            t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad(), t.acc.autocast():
            l_post = sequence_mean(*forward(post))
    finally:
        t.model.train()
        snap.restore()
    return l_pre.double().numpy(), l_post.double().numpy()


def test_probe_restores_everything(trained):
    before = _everything(trained)
    now = trained.evaluate(n_batches=1, use_cache=False)
    after_probe = probe.probe(trained.state, 1, steps=3, n_batches=1)
    assert after_probe["rev"]["loss"] != now["rev"]["loss"]  # the probe really trained
    _assert_identical(before, _everything(trained))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_lookahead_restores_everything(trained, kind):
    before = _everything(trained)
    res = probe.lookahead(trained.state, 0, optimizer=kind)
    assert res.pre.shape == res.post.shape == (8,)
    assert not np.allclose(res.pre, res.post)  # the virtual step really moved the model
    _assert_identical(before, _everything(trained))


@pytest.mark.parametrize("model", [None, *DROPOUT])
def test_training_after_a_probe_equals_training_without(make_config, tmp_path, model):
    """Also with dropout, which draws from the RNG in every branch and every training step."""
    raw = _raw(make_config, model)

    def run(with_probe):
        t = Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/{with_probe}"]))
        for i in range(4):
            if with_probe and i == 2:
                probe.probe(t.state, 0, steps=2, n_batches=1)
                probe.lookahead(t.state, 1, optimizer="adam")
                probe.lookahead(t.state, 0, optimizer="sgd")
                probe.example_losses(t.state, 1)
                assert all(_modes(t))
            ds, ex = t.sampler.next_batch(8)
            t.train_step(ds, ex)
        return [p.detach().clone() for p in t.params]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("model", DROPOUT)
def test_lookahead_measures_without_dropout(make_config, model, kind):
    """A step of size 0 changes nothing, so L_post must equal L_pre exactly: the same
    dropout-free forward twice. Measured in train mode, two dropout masks made them differ."""
    t = _trained(make_config, model)
    assert probe._active_dropout(t.model)
    for g in probe.unwrap_optimizer(t.optimizer).param_groups:
        g["lr"] = 0.0
    before, modes = _everything(t), _modes(t)
    res = probe.lookahead(t.state, 0, optimizer=kind)
    assert np.array_equal(res.pre, res.post)
    again = probe.lookahead(t.state, 0, optimizer=kind)
    assert np.array_equal(res.pre, again.pre) and np.array_equal(res.post, again.post)
    assert np.array_equal(probe.example_losses(t.state, 0), res.pre)  # one measurement, one number
    _assert_identical(before, _everything(t))
    assert _modes(t) == modes
    # The equality above means something: this model's train-mode forwards are noisy.
    _, batch = probe._reward_batch(t.state, 0, None, None)
    with torch.no_grad():
        a, b = (probe._sequence_losses(t.model, batch) for _ in range(2))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("model", DROPOUT)
def test_lookahead_steps_on_the_training_gradient(make_config, model):
    """With dropout: L_pre and L_post in eval mode, the gradient from a train-mode forward
    (dropout on, the run's RNG), as a real step's; not the dropout-free gradient."""
    t = _trained(make_config, model)
    before = _everything(t)
    pre, post = _by_hand(t, "sgd", pre="eval", grad="train", post="eval")
    _, clean_post = _by_hand(t, "sgd", pre="eval", grad="eval", post="eval")
    res = probe.lookahead(t.state, 0)
    assert np.array_equal(res.pre, pre) and np.array_equal(res.post, post)
    assert not np.array_equal(res.post, clean_post)
    assert (res.post < res.pre).mean() > 0.5  # the step helps most examples
    _assert_identical(before, _everything(t))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("model", [None, "lora"])
def test_lookahead_without_dropout_is_unchanged(make_config, model, kind):
    """p = 0 everywhere (LoRA's dropout is then an nn.Identity): the single-forward look-ahead
    of before, bit for bit and forward for forward (2: one back-propagated, one after)."""
    t = _trained(make_config, model)
    assert not probe._active_dropout(t.model)
    pre, post = _by_hand(t, kind, pre=None, grad="train", post="train")
    forwards = []
    hook = t.model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        res = probe.lookahead(t.state, 0, optimizer=kind)
    finally:
        hook.remove()
    assert np.array_equal(res.pre, pre) and np.array_equal(res.post, post)
    assert len(forwards) == 2


def test_modes_come_back_mixed_and_after_errors(make_config):
    """Each module's own mode comes back (a mixed model stays mixed), also when a forward
    raises; the run's state too."""
    t = _trained(make_config, "lora_dropout")
    next(m for m in t.model.modules() if type(m).__name__.endswith("RMSNorm")).eval()
    before, modes = _everything(t), _modes(t)
    assert not all(modes) and probe._active_dropout(t.model)
    probe.lookahead(t.state, 0)
    probe.example_losses(t.state, 0)
    assert _modes(t) == modes
    for fail_at in (1, 2, 3):  # L_pre (eval), the gradient's forward (train), L_post (eval)
        forwards = []

        def boom(*_):
            forwards.append(1)
            if len(forwards) == fail_at:
                raise RuntimeError("boom")

        hook = t.model.register_forward_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                probe.lookahead(t.state, 0, optimizer="adam")
            if fail_at == 1:
                forwards.clear()
                with pytest.raises(RuntimeError, match="boom"):
                    probe.example_losses(t.state, 0)
        finally:
            hook.remove()
        assert _modes(t) == modes
        _assert_identical(before, _everything(t))
