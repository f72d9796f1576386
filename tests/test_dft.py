"""DFT: against a naive per-token loop, against TRL's ``loss_type="dft"``, and in the loop."""

import collections
import types

import pytest
import torch

from conftest import TINY_MODEL
from helpers import adam_tol
from mixtune import config
from mixtune.engine.loop import Trainer
from mixtune.errors import ConfigError
from mixtune.losses.core import IGNORE, micro_batch_scales, reduce
from mixtune.losses.dft import DFT, dft


def _batch(seed=0, B=3, T=9, V=13):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, T, V, generator=g)).requires_grad_()  # (B, T, V)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE
    labels[2, 6:] = IGNORE
    return logits, labels


def _reduce(terms, n_tokens=None):
    return reduce(terms.per_token, terms.mask, terms.token_weights, terms.sample_weights, n_tokens)


def test_dft_equals_naive_per_token_loop():
    logits, labels = _batch()
    terms = dft(logits, labels)
    got = _reduce(terms)
    (g_got,) = torch.autograd.grad(got, logits)

    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == IGNORE:
                continue
            logp = torch.log_softmax(logits[b, t], -1)[y]
            total = total - logp.exp().detach() * logp
            count += 1
    want = total / count
    (g_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)
    # The DFT gradient wrt the logits is -p * (onehot - softmax): bounded by p, unlike SFT's.
    assert g_got.abs().max() < 1.0 / count


def test_dft_equals_trl_dft_loss():
    pytest.importorskip("trl")
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import SFTTrainer
    from trl.trainer.utils import add_fused_lm_head

    spec = {k: v for k, v in TINY_MODEL.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=50, **spec))
    # The head SFTTrainer installs; its compute_loss is then called on a minimal stand-in `self`.
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE
    labels[2, 9:] = IGNORE
    attn = torch.ones_like(ids)
    attn[2, 9:] = 0
    n = int((labels[:, 1:] != IGNORE).sum())  # TRL's num_items_in_batch = mixtune's step count
    stub = types.SimpleNamespace(
        model=model,
        aux_loss_enabled=False,
        compute_loss_func=None,
        label_smoother=None,
        args=types.SimpleNamespace(loss_type="dft", average_tokens_across_devices=False),
        accelerator=types.SimpleNamespace(
            parallelism_config=None, num_processes=1, gather_for_metrics=lambda x: x
        ),
        _metrics={"train": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        get_tp_size=lambda: 1,
    )
    trl_loss = SFTTrainer.compute_loss(
        stub,
        model,
        {"input_ids": ids, "attention_mask": attn, "labels": labels},
        num_items_in_batch=n,
    )
    trl_grads = torch.autograd.grad(trl_loss, list(model.parameters()))

    terms = DFT()(model(input_ids=ids, attention_mask=attn).logits, labels)
    ours = _reduce(terms, n)
    our_grads = torch.autograd.grad(ours, list(model.parameters()))
    torch.testing.assert_close(ours, trl_loss.detach(), rtol=1e-6, atol=1e-7)
    for a, b in zip(our_grads, trl_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_micro_batch_normalizer_is_verl_per_micro_batch_mean():
    logits, labels = _batch(seed=1, B=4)
    parts = [(logits[:1], labels[:1]), (logits[1:], labels[1:])]  # uneven token counts
    fake = types.SimpleNamespace(world=1, acc=types.SimpleNamespace(device="cpu"))
    scales = micro_batch_scales(fake, [{"labels": lab} for _, lab in parts])
    n_step = float((labels[:, 1:] != IGNORE).sum())
    got = 0.0
    for (lg, lab), s in zip(parts, scales):
        terms = DFT(DFT.Config(normalizer="micro_batch"))(lg, lab, {"scale": s})
        got = got + _reduce(terms, n_step)
    verl = sum(_reduce(dft(lg, lab)) for lg, lab in parts) / len(parts)  # mean of mb means
    torch.testing.assert_close(got, verl)
    step_mean = _reduce(dft(logits, labels))
    assert abs(got.item() - step_mean.item()) > 1e-4  # the two normalisers really differ here


def test_bad_option_names_the_field(make_config):
    with pytest.raises(ConfigError, match=r"loss.normalizer"):
        config.load(data=make_config(loss={"name": "dft", "normalizer": "batch"}))


def test_dft_run_accumulation_exact_and_logged(make_config, tmp_path):
    raw = make_config(max_steps=3, loss={"name": "dft"}, evals=[])
    raw["train"].update(eval_every=0, log_every=1)
    runs = {}
    for micro in (1, 8):
        trainer = Trainer(
            config.load(
                data=raw,
                overrides=[f"output_dir={tmp_path}/m{micro}", f"train.micro_batch_size={micro}"],
            )
        )
        trainer.run()
        runs[micro] = trainer
    # The same update up to float rounding (the step's gradient summed in another order).
    tol = adam_tol(raw["train"]["lr"], steps=3)
    for a, b in zip(runs[1].params, runs[8].params):
        torch.testing.assert_close(a, b, **tol)
    from mixtune.engine.rundir import read_metrics

    rec = read_metrics(tmp_path / "m8")[-1]
    assert 0 < rec["loss"]["p_mean"] < 1 and rec["loss"]["p_low"] + rec["loss"]["p_high"] <= 1
