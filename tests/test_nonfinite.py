"""train.nonfinite: a NaN/inf loss either stops the run or skips that step's update, and the
weights are never touched by a non-finite gradient."""

import math

import pytest
import torch
from safetensors.torch import load_file

from mixtune import config
from mixtune.engine.loop import Trainer
from mixtune.engine.rundir import read_metrics
from mixtune.errors import ConfigError, TrainingError
from mixtune.losses.base import Loss


class Poisoned(Loss):
    """The run's loss, NaN wherever ``poison()`` says so."""

    def __init__(self, inner: Loss, poison):
        self.inner, self.poison = inner, poison

    def prepare(self, state, batches):
        return self.inner.prepare(state, batches)

    def __call__(self, logits, labels, extra=None):
        terms = self.inner(logits, labels, extra)
        if self.poison():
            terms.per_token = terms.per_token * float("nan")
        return terms


def _poison(trainer, bad_steps):
    """Make the loss NaN on the optimizer steps in ``bad_steps`` (1-based)."""
    # trainer.step counts completed steps
    trainer.loss_fn = Poisoned(trainer.loss_fn, lambda: trainer.step + 1 in bad_steps)


def _skip_batches(trainer, drop):
    """Reference run: draw the batches of the steps in ``drop`` and throw them away."""
    draw, calls = trainer.sampler.next_batch, {"n": 0}

    def next_batch(n):
        while True:
            calls["n"] += 1
            batch = draw(n)
            if calls["n"] not in drop:
                return batch

    trainer.sampler.next_batch = next_batch


def _raw(make_config, **train):
    raw = make_config(max_steps=8)
    # The poisoned loss scores the full logits; the references (plain SFT) take the same path,
    # so the two are compared bit for bit.
    raw["train"].update(eval_every=0, log_every=1, max_grad_norm=None, logits="full", **train)
    return raw


def test_skip_drops_exactly_the_bad_updates(make_config, tmp_path):
    bad = {3, 5}
    raw = _raw(make_config, nonfinite="skip")
    skip = Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/skip"]))
    _poison(skip, bad)
    summary = skip.run()
    assert summary["steps"] == 8
    # The reference never sees those batches and takes 8 - 2 real steps of the same schedule.
    ref = Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/ref"]))
    _skip_batches(ref, bad)
    ref.run(stop_after=8 - len(bad))
    for a, b in zip(skip.params, ref.params):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert skip.scheduler.get_last_lr() == ref.scheduler.get_last_lr()

    records = {r["step"]: r for r in read_metrics(tmp_path / "skip")}
    assert records[3]["skipped_nonfinite"] == 1 and records[5]["skipped_nonfinite"] == 2
    assert all("skipped_nonfinite" not in records[s] for s in (1, 2, 4, 6, 7, 8))
    # Training losses of skipped steps are not averaged into the logs (nor the mixer's view).
    assert all(math.isfinite(r["train"]["loss"]) for r in records.values() if "train" in r)
    assert skip.counters["skipped_nonfinite"] == 2


def test_skip_stops_after_max_consecutive_with_weights_intact(make_config, tmp_path):
    raw = _raw(make_config, nonfinite="skip", max_nonfinite=3, save_every=2)
    trainer = Trainer(config.load(data=raw))
    _poison(trainer, {3, 4, 5, 6, 7, 8})
    with pytest.raises(
        TrainingError,
        match=r"3 consecutive non-finite steps up to step 5 "
        r"\(train.max_nonfinite=3\)",
    ):
        trainer.run()
    saved = load_file(str(tmp_path / "run/checkpoints/step-000002/trainable.safetensors"))
    live = dict((n, p) for n, p in trainer.model.named_parameters())
    for name, tensor in saved.items():  # nothing moved after step 2
        torch.testing.assert_close(live[name].detach(), tensor, rtol=0, atol=0)


def test_streak_resets_after_a_good_step(make_config, tmp_path):
    raw = _raw(make_config, nonfinite="skip", max_nonfinite=2)
    trainer = Trainer(config.load(data=raw))
    _poison(trainer, {2, 4, 6})  # never two in a row
    assert trainer.run()["steps"] == 8
    assert trainer.counters["skipped_nonfinite"] == 3
    assert all(torch.isfinite(p).all() for p in trainer.params)


def test_stop_is_the_default_and_names_the_option(make_config, tmp_path):
    raw = _raw(make_config, save_every=2)
    trainer = Trainer(config.load(data=raw))
    _poison(trainer, {3})
    with pytest.raises(TrainingError, match="non-finite loss/gradient at step 3.*nonfinite=skip"):
        trainer.run()
    assert trainer.counters["skipped_nonfinite"] == 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.nonfinite=ignore", "train.nonfinite: got 'ignore'; allowed values are"),
        ("train.max_nonfinite=0", "train.max_nonfinite: must be >= 1"),
    ],
)
def test_bad_options(make_config, override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(data=make_config(), overrides=[override])
