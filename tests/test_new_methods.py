"""Adding a method: its own file (tests/toy_methods.py) plus one registry line, nothing else.

The toy mixer and loss are registered here by name and module path -- exactly what their line
in ``mixtune.registry`` would say -- and trained with through the ordinary config and loop.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mixtune import config
from mixtune.engine.loop import Trainer
from mixtune.errors import ConfigError
from mixtune.registry import LOSSES, MIXERS


@pytest.fixture
def toys():
    MIXERS.register("toy", "toy_methods:ToyMixer")  # the registry line
    LOSSES.register("toy", "toy_methods:ToyLoss")  # the registry line
    yield
    del MIXERS["toy"], LOSSES["toy"]


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]


def test_a_new_mixer_and_loss_train_through_the_ordinary_loop(toys, make_config, tmp_path):
    raw = make_config(mixer={"name": "toy", "every": 2}, loss={"name": "toy", "scale": 1.0})
    cfg = config.load(data=raw)
    assert cfg.mixer.options.every == 2 and cfg.loss.options.scale == 1.0  # parsed once
    trainer = Trainer(cfg)
    trainer.run()
    recs = _records(tmp_path / "run")
    updates = [r for r in recs if r.get("mixer", {}).get("updates")]
    assert [r["step"] for r in updates] == [0, 2, 4, 6]
    # The mixer's rule where the answer is known: at steps 0 and 4 its evaluation is the
    # scheduled one (same examples), so the weights are the logged losses, normalised.
    for r in (r for r in updates if "eval" in r):
        loss = np.array([r["eval"]["add"]["loss"], r["eval"]["rev"]["loss"]])
        assert [r["weights"]["add"], r["weights"]["rev"]] == pytest.approx(loss / loss.sum())
    assert sum("eval" in r for r in updates) == 2
    diag = [r["loss"] for r in recs if "loss" in r]
    assert diag and diag[-1]["steps"] == 8  # the loss's hooks ran once per optimizer step


def test_a_new_loss_is_what_trains(toys, make_config, tmp_path):
    """scale 0: nothing learned (Adam on zero gradients moves nothing); scale 1: exactly SFT."""

    def params(loss, out, *overrides):
        raw = make_config(loss=loss, output_dir=str(tmp_path / out))
        t = Trainer(config.load(data=raw, overrides=list(overrides)))
        before = [p.detach().clone() for p in t.params]
        t.run()
        return before, [p.detach().clone() for p in t.params]

    before, after = params({"name": "toy", "scale": 0.0}, "zero")
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    _, toy = params({"name": "toy", "scale": 1.0}, "one")
    # The toy scores the full logits it is given; SFT on the same path (by default it projects
    # only the supervised positions: the same values up to float rounding, not the same bits).
    _, sft = params({"name": "sft"}, "sft", "train.logits=full")
    assert all(torch.equal(a, b) for a, b in zip(toy, sft))


def test_a_new_method_is_checked_like_the_built_in_ones(toys, make_config):
    with pytest.raises(ConfigError, match="mixer.nope: unknown key"):
        config.load(data=make_config(mixer={"name": "toy", "nope": 1}))
    with pytest.raises(ConfigError, match="loss.scale"):
        config.load(data=make_config(loss={"name": "toy", "scale": "big"}))
    with pytest.raises(ValueError, match="already registered"):
        MIXERS.register("toy", "toy_methods:ToyMixer")


def test_a_new_mixer_declares_what_it_needs():
    """The HF Trainer adapter cannot evaluate per domain: a mixer requiring it is refused there
    by its declaration alone (the adapter names no method)."""
    pytest.importorskip("transformers")
    from mixtune.integrations import MixtureCallback, MixtureDataset

    MIXERS.register("toy", "toy_methods:ToyMixer")
    try:
        mix = MixtureDataset({"a": [{"input_ids": [1, 2, 3]}], "b": [{"input_ids": [4, 5]}]})
        with pytest.raises(ConfigError, match="mixtune train"):
            MixtureCallback(mix, "toy")
    finally:
        del MIXERS["toy"]
