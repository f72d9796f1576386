"""The chunked and supervised loss paths (mixtune.losses.logits) compute what the full-logits
path computes."""

import pytest
import torch

from helpers import numeric_leaves, tiny_llama
from mixtune import config
from mixtune.data.tokenize import IGNORE
from mixtune.engine.loop import Trainer
from mixtune.engine.rundir import read_metrics
from mixtune.losses import logits as lg
from mixtune.losses.core import token_losses
from mixtune.registry import LOSSES


def _labels(B=3, T=12, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = IGNORE  # a prompt
    labels[1, 8:] = IGNORE  # padding
    labels[2, :] = IGNORE  # nothing supervised
    return labels


@pytest.mark.parametrize("chunk", [1, 4, 1000, lg.WHOLE])
def test_chunked_nll_equals_token_losses_in_values_and_gradients(chunk):
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 3, 12, 16, 50
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    bias = torch.randn(V, generator=g, requires_grad=True)
    labels = _labels(B, T, V)
    ref, ref_mask = token_losses(torch.nn.functional.linear(hidden, weight, bias), labels)
    ref_grads = torch.autograd.grad((ref * torch.arange(1.0, T)).sum(), (hidden, weight, bias))
    if chunk == lg.WHOLE:
        got, mask = lg.supervised_nll(hidden, weight, bias, labels)
    else:
        got, mask = lg.chunked_nll(hidden, weight, bias, labels, chunk)
    grads = torch.autograd.grad((got * torch.arange(1.0, T)).sum(), (hidden, weight, bias))
    assert torch.equal(mask, ref_mask) and got.shape == ref.shape
    assert torch.all(got[~mask] == 0)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _batch(vocab=300):
    labels = _labels(3, 12, vocab)
    ids = labels.clamp(min=0)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("mode", ["chunked", "supervised"])
@pytest.mark.parametrize("loss_name", ["sft", "dft", "cadft"])
def test_a_model_on_the_chunked_path_gives_the_full_path_losses_and_gradients(loss_name, mode):
    model, batch = tiny_llama(vocab=300), _batch()
    cls = LOSSES[loss_name]
    loss = cls(cls.Config() if cls.Config else None)

    def run():
        model.zero_grad()
        terms = lg.loss_terms(loss, model, batch)
        total = (terms.per_token * terms.mask).sum()
        if terms.token_weights is not None:
            total = (terms.per_token * terms.token_weights).sum()
        total.backward()
        return terms.per_token.detach(), [p.grad.clone() for p in model.parameters()]

    assert lg.configure(model, "full", 4) is False
    ref, ref_grads = run()
    assert lg.configure(model, mode, 4) is True and lg.is_chunked(model)
    got, grads = run()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # The output layer is itself again afterwards: a plain forward still gives logits.
    assert model(input_ids=batch["input_ids"]).logits.shape[-1] == 300


def test_auto_chunks_large_vocabularies_projects_supervised_tokens_below_and_full_never():
    small = tiny_llama(vocab=300)
    assert lg.configure(small, "auto", 8) is True and lg._CHUNK[small] == lg.WHOLE
    big = tiny_llama(vocab=lg.AUTO_MIN_VOCAB, tie=False)
    assert lg.configure(big, "auto", 8) is True and lg._CHUNK[big] == 8
    assert lg.configure(big, "full", 8) is False and not lg.is_chunked(big)
    assert lg.configure(big, "auto", 8, sharded=True) is False
    assert lg.configure(small, "auto", 8, sharded=True) is False


def test_a_model_that_soft_caps_its_logits_keeps_the_full_path():
    """Gemma-2-style soft-capping after the output layer: not a projection of hidden states."""
    model = tiny_llama(vocab=300)

    def cap(module, args, out):
        out["logits"] = torch.tanh(out.logits / 0.3) * 0.3

    model.register_forward_hook(cap)
    with pytest.raises(ValueError, match="transforms its logits.*train.logits=full"):
        lg.configure(model, "chunked", 8)
    with pytest.raises(ValueError, match="logits=supervised: .*transforms its logits"):
        lg.configure(model, "supervised", 8)
    assert lg.configure(model, "auto", 8) is False
    assert not lg.is_chunked(model)


def test_a_wrapped_output_layer_is_refused():
    class Wrapped(torch.nn.Linear):
        pass

    model = tiny_llama(vocab=300, tie=False)
    old = model.lm_head
    model.lm_head = Wrapped(old.in_features, old.out_features, bias=False)
    with pytest.raises(ValueError, match="not a plain Linear"):
        lg.configure(model, "chunked", 8)


@pytest.mark.parametrize("mode", ["chunked", "supervised"])
@pytest.mark.parametrize("loss_name", ["sft", "dft"])
def test_a_run_on_the_chunked_path_tracks_the_full_path(make_config, tmp_path, loss_name, mode):
    """Training, evaluation and the logged per-dataset losses, step by step, over a run with
    gradient accumulation (micro-batches of 2)."""
    raw = make_config(max_steps=4, loss={"name": loss_name})
    raw["train"]["micro_batch_size"] = 2
    runs = {}
    for mode in ("full", mode):
        cfg = config.load(
            data=raw, overrides=[f"output_dir={tmp_path}/{mode}", f"train.logits={mode}"]
        )
        Trainer(cfg).run()
        runs[mode] = read_metrics(tmp_path / mode)
    a, b = runs["full"], runs[mode]
    assert [r.get("step") for r in a] == [r.get("step") for r in b]
    n = 0
    for ra, rb in zip(a, b):
        for key in ("train", "eval"):
            if key in ra:
                flat_a = numeric_leaves(ra[key])
                flat_b = numeric_leaves(rb[key])
                assert flat_a.keys() == flat_b.keys()
                for k in flat_a:
                    assert flat_b[k] == pytest.approx(flat_a[k], rel=1e-4, abs=1e-5), (key, k)
                    n += 1
    assert n > 10
    assert config.load(tmp_path / f"{mode}/config.yaml").train.logits == mode


def test_under_bf16_autocast_the_chunked_path_tracks_the_full_one():
    """Autocast applies to the chunked projection as to the model's own output layer, in the
    backward too; the weight's gradient stays in the weight's dtype (fp32 master weights)."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 10, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    labels = _labels(3, 10, 40)
    out = {}
    for name, fn in {
        "full": lambda: token_losses(torch.nn.functional.linear(hidden, weight), labels),
        "chunked": lambda: lg.chunked_nll(hidden, weight, None, labels, 3),
        "supervised": lambda: lg.supervised_nll(hidden, weight, None, labels),
    }.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll, mask = fn()
        grads = torch.autograd.grad(nll.sum(), (hidden, weight))
        out[name] = (nll, grads)
    for path in ("chunked", "supervised"):
        assert out[path][1][1].dtype == torch.float32
        torch.testing.assert_close(out[path][0], out["full"][0], atol=2e-2, rtol=2e-2)
        for a, b in zip(out[path][1], out["full"][1]):
            torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


def test_a_loss_that_needs_the_logits_gets_them_on_the_chunked_path_in_one_forward():
    from mixtune.losses.base import Loss

    seen = []

    class NeedsLogits(Loss):
        def __call__(self, logits, labels, extra=None):
            seen.append(logits.shape[-1])
            return LOSSES["sft"]()(logits, labels, extra)

    model, batch = tiny_llama(vocab=300), _batch()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    assert lg.configure(model, "chunked", 4)
    calls.clear()  # (configure's check forwards)
    lg.loss_terms(NeedsLogits(), model, batch)
    assert seen == [300] and len(calls) == 1
    calls.clear()
    lg.loss_terms(LOSSES["sft"](), model, batch)  # per-token NLL: chunked, one forward
    assert len(calls) == 1 and seen == [300]
