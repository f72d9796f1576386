"""Mixed precision: bf16 autocast over fp32 master weights; pure bf16 only when asked for."""

import pytest
import torch

from mixtune import config
from mixtune.engine import build
from mixtune.engine.loop import Trainer
from mixtune.engine.rundir import read_metrics


def test_auto_keeps_trained_weights_in_fp32_and_autocasts_on_a_bf16_gpu(monkeypatch):
    monkeypatch.setattr(build, "bf16_device", lambda: False)
    assert build.pick_dtype("auto") == torch.float32
    assert build.pick_dtype("auto", frozen=True) == torch.float32
    assert build.pick_mixed_precision("auto") == "no"
    monkeypatch.setattr(build, "bf16_device", lambda: True)
    assert build.pick_dtype("auto") == torch.float32  # the master copy
    assert build.pick_dtype("auto", frozen=True) == torch.bfloat16  # a LoRA run's base
    assert build.pick_mixed_precision("auto") == "bf16"
    assert build.pick_dtype("bfloat16") == torch.bfloat16
    assert build.pick_mixed_precision("fp32") == "no"


def _moved_share(make_config, tmp_path, name, *overrides):
    """Share of the trainable parameters with a non-zero gradient that one step at lr 1e-5
    changed (Adam: each moves by about lr)."""
    raw = make_config(max_steps=1)
    cfg = config.load(
        data=raw,
        overrides=[
            f"output_dir={tmp_path}/{name}",
            "train.lr=1e-5",
            "train.schedule=constant",
            "train.eval_every=0",
            *overrides,
        ],
    )
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.params]
    grads = {}
    hooks = [
        p.register_post_accumulate_grad_hook(lambda q, i=i: grads.__setitem__(i, q.grad.clone()))
        for i, p in enumerate(trainer.params)
    ]
    trainer.run()
    for h in hooks:
        h.remove()
    live = moved = 0
    for i, (p, b) in enumerate(zip(trainer.params, before)):
        nz = grads[i] != 0
        live += int(nz.sum())
        moved += int(((p.detach() != b) & nz).sum())
    return moved / live, trainer, read_metrics(tmp_path / name)


def test_bf16_autocast_keeps_fp32_master_weights_that_take_every_small_update(
    make_config, tmp_path
):
    share, trainer, mixed = _moved_share(
        make_config, tmp_path, "mixed", "train.mixed_precision=bf16"
    )
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert share == 1.0
    pure, trainer, _ = _moved_share(
        make_config, tmp_path, "pure", "model.dtype=bfloat16", "train.mixed_precision=fp32"
    )
    assert all(p.dtype == torch.bfloat16 for p in trainer.params)
    assert pure < 0.5  # most bf16 updates round away: why the master copy matters
    _, _, full = _moved_share(make_config, tmp_path, "fp32", "train.mixed_precision=fp32")
    # The bf16-autocast losses track fp32 (a stated tolerance: 2% relative on this model).
    a = [r["eval"] for r in full if "eval" in r]
    b = [r["eval"] for r in mixed if "eval" in r]
    assert a and len(a) == len(b)
    for ra, rb in zip(a, b):
        for dom in ra:
            assert rb[dom]["loss"] == pytest.approx(ra[dom]["loss"], rel=0.02)


def test_fp16_keeps_fp32_master_weights_that_take_every_small_update(make_config, tmp_path):
    share, trainer, _ = _moved_share(make_config, tmp_path, "fp16", "train.mixed_precision=fp16")
    assert trainer.scaler is not None  # float16 autocast with loss scaling, on this CPU too
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert share == 1.0


def test_fp16_is_mixtunes_own_autocast_not_accelerates():
    """accelerate would train fp32 on a CPU under mixed_precision=fp16; mixtune builds it with
    none and autocasts itself (engine/precision.py)."""
    assert build.pick_mixed_precision("fp16") == "no"
