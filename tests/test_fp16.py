"""fp16 mixed precision (train.mixed_precision=fp16): float16 autocast over fp32 master weights
with a dynamic loss scaler, on CPU (torch's CPU autocast runs float16)."""

import logging
import math

import pytest
import torch

from mixtune import config
from mixtune.engine import precision
from mixtune.engine.loop import Trainer
from mixtune.engine.rundir import read_metrics
from mixtune.engine.snapshot import Snapshot
from mixtune.errors import ConfigError, TrainingError


def _trainer(make_config, tmp_path, name, *overrides, max_steps=4):
    raw = make_config(max_steps=max_steps)
    cfg = config.load(
        data=raw,
        overrides=[
            f"output_dir={tmp_path}/{name}",
            "train.eval_every=2",
            "train.log_every=1",
            *overrides,
        ],
    )
    return Trainer(cfg)


def _overflow_at(trainer, steps: set[int]):
    """Make the gradients of the optimizer steps in ``steps`` (1-based) overflow to inf while
    the loss stays finite: what a too-large loss scale does."""

    def hook(p):
        if trainer.step + 1 in steps:
            p.grad.fill_(math.inf)

    return trainer.params[0].register_post_accumulate_grad_hook(hook)


def test_loss_scaler_grows_after_clean_steps_and_halves_on_overflow():
    s = precision.LossScaler(init_scale=8.0, growth_interval=3)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 16.0)
    s.unscale_([p])
    assert p.grad.tolist() == [2.0, 2.0]
    for _ in range(3):
        s.update()
    assert s.scale == 16.0 and s.good_steps == 0
    s.update()
    s.backoff()
    assert s.scale == 8.0 and s.good_steps == 0
    t = precision.LossScaler()
    t.load_state_dict(s.state_dict())
    assert (t.scale, t.good_steps) == (8.0, 0)


def test_fp16_autocasts_over_fp32_masters_and_tracks_fp32(make_config, tmp_path):
    half = _trainer(make_config, tmp_path, "fp16", "train.mixed_precision=fp16")
    assert half.scaler is not None and half.scaler.scale == 2.0**16
    seen = []
    # A decoder layer's projection (the output layer runs as the identity on the supervised
    # logits path; its projection is the loss's own, under the same autocast).
    proj = half.acc.unwrap_model(half.model).model.layers[0].mlp.down_proj
    proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    half.run()
    assert torch.float16 in seen  # really autocast, not fp32 under another name
    assert all(p.dtype == torch.float32 for p in half.params)
    full = _trainer(make_config, tmp_path, "fp32", "train.mixed_precision=fp32")
    full.run()
    a = [r for r in read_metrics(tmp_path / "fp32") if "eval" in r]
    b = [r for r in read_metrics(tmp_path / "fp16") if "eval" in r]
    assert len(a) == len(b) == 3
    # The stated tolerance: fp16 losses within 0.1% of fp32's on this model.
    for ra, rb in zip(a, b):
        for dom in ra["eval"]:
            assert rb["eval"][dom]["loss"] == pytest.approx(ra["eval"][dom]["loss"], rel=1e-3)
        for k, v in ra["train"].items() if "train" in ra else ():
            assert rb["train"][k] == pytest.approx(v, rel=1e-3)


def test_an_overflow_step_is_skipped_and_halves_the_scale(make_config, tmp_path):
    clean = _trainer(make_config, tmp_path, "clean", "train.mixed_precision=fp16", max_steps=5)
    clean.run()
    trainer = _trainer(make_config, tmp_path, "over", "train.mixed_precision=fp16", max_steps=5)
    _overflow_at(trainer, {2})
    trainer.run()
    assert trainer.scaler.scale == 2.0**15
    records = {r["step"]: r for r in read_metrics(tmp_path / "over")}
    ref = {r["step"]: r for r in read_metrics(tmp_path / "clean")}
    assert records[2]["skipped_overflow"] == 1 and records[2]["loss_scale"] == 2.0**15
    assert "skipped_nonfinite" not in records[2]
    assert "train" not in records[2]  # nothing to average: no training loss of 0.0
    assert records[3]["train"]["loss"] > 0
    # Not an optimizer or LR-schedule step: step 3 of this run is step 2 of the clean run.
    assert records[2]["lr"] == ref[1]["lr"]
    assert records[3]["lr"] == ref[2]["lr"]
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else None
    opt = opt or trainer.optimizer
    assert int(opt.state[trainer.params[0]]["step"]) == 4  # 5 steps, one skipped


def test_fp16_still_stops_on_real_divergence(make_config, tmp_path):
    trainer = _trainer(make_config, tmp_path, "nan", "train.mixed_precision=fp16")
    with torch.no_grad():  # a non-finite loss is divergence, not a loss-scale overflow
        trainer.acc.unwrap_model(trainer.model).get_input_embeddings().weight.fill_(math.nan)
    with pytest.raises(TrainingError, match="non-finite loss/gradient at step 1"):
        trainer.run()
    trainer = _trainer(make_config, tmp_path, "scale1", "train.mixed_precision=fp16")
    trainer.scaler.scale = 1.0  # overflowing float16 even unscaled
    _overflow_at(trainer, {1})
    with pytest.raises(TrainingError, match="non-finite loss/gradient at step 1"):
        trainer.run()


def test_fp16_resumes_exactly_with_its_loss_scale(make_config, tmp_path):
    over = ["train.mixed_precision=fp16", "train.save_every=2"]
    whole = _trainer(make_config, tmp_path, "whole", *over, max_steps=5)
    _overflow_at(whole, {1})
    whole.run()
    first = _trainer(make_config, tmp_path, "split", *over, max_steps=5)
    _overflow_at(first, {1})
    first.run(stop_after=2)
    resumed = _trainer(make_config, tmp_path, "split", *over, max_steps=5)
    assert resumed.scaler.scale == 2.0**16  # before the checkpoint is read
    resumed.run()
    assert resumed.scaler.scale == whole.scaler.scale == 2.0**15
    strip = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(tmp_path / "whole")]
    again = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(tmp_path / "split")]
    assert again == strip


def test_a_snapshot_restores_the_loss_scale(make_config, tmp_path):
    trainer = _trainer(make_config, tmp_path, "snap", "train.mixed_precision=fp16")
    trainer.scaler.update()
    snap = Snapshot(trainer.state)
    trainer.scaler.backoff()
    snap.restore()
    assert (trainer.scaler.scale, trainer.scaler.good_steps) == (2.0**16, 1)


def test_a_device_without_fp16_falls_back_with_a_notice(make_config, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(precision, "fp16_autocast_works", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="mixtune.engine.precision"):
        trainer = _trainer(make_config, tmp_path, "nofp16", "train.mixed_precision=fp16")
    assert trainer.scaler is None
    assert any(
        "has no float16 autocast; training in fp32" in r.getMessage() for r in caplog.records
    )


def test_fp16_over_bf16_weights_is_a_config_error(make_config):
    with pytest.raises(ConfigError, match="fp16 autocast over model.dtype=bfloat16"):
        config.load(
            data=make_config(),
            overrides=["train.mixed_precision=fp16", "model.dtype=bfloat16"],
        )


def test_an_fp16_lookahead_is_loss_scaled_and_skips_on_overflow(make_config, tmp_path):
    """DynamixSFT's look-ahead under fp16 scales its backward with the run's scale and
    unscales before the virtual step (the step equals the one without scaling: powers of two),
    and a gradient that overflows takes no virtual step (post = pre, nothing NaN); the scaler
    is left as it was."""
    from mixtune.engine import probe

    t = _trainer(make_config, tmp_path, "ahead", "train.mixed_precision=fp16")
    scaled = probe.lookahead(t.state, 0, key=3, batch_size=4)
    scaler, t.state.scaler = t.state.scaler, None
    plain = probe.lookahead(t.state, 0, key=3, batch_size=4)
    t.state.scaler = scaler
    assert (scaled.pre == plain.pre).all()
    assert abs(scaled.post - scaled.pre).max() > 1e-4  # the virtual step moved the losses
    assert scaled.post == pytest.approx(plain.post, rel=1e-5, abs=1e-6)
    scaler.scale = 1e38  # loss x scale overflows: every gradient inf/NaN
    over = probe.lookahead(t.state, 0, key=3, batch_size=4)
    assert scaler.scale == 1e38 and scaler.good_steps == 0
    assert (over.post == over.pre).all() and (over.post == scaled.pre).all()
    t.close()
