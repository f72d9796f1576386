import pytest
import torch
import torch.nn.functional as F

from mixtune.losses.base import Loss
from mixtune.losses.core import IGNORE, reduce, sequence_mean, token_losses
from mixtune.registry import LOSSES

HOOKS = ("prepare", "after_step", "diagnostics", "state_dict", "load_state_dict", "on_resume")


def _batch(seed=0, B=3, T=7, V=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGNORE
    labels[2, 5:] = IGNORE
    return logits, labels


def test_token_mean_matches_cross_entropy():
    logits, labels = _batch()
    nll, mask = token_losses(logits, labels)
    ref = F.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )
    torch.testing.assert_close(reduce(nll, mask), ref)


def test_per_token_values_and_mask():
    logits, labels = _batch()
    nll, mask = token_losses(logits, labels)
    assert nll.shape == mask.shape == (3, 6)
    assert (nll[~mask] == 0).all()
    lp = torch.log_softmax(logits[1, 2], -1)
    torch.testing.assert_close(nll[1, 2], -lp[labels[1, 3]])


def test_split_batches_with_global_count_equal_full_batch():
    logits, labels = _batch(seed=1, B=4)
    nll, mask = token_losses(logits, labels)
    full = reduce(nll, mask)
    n = mask.sum()
    parts = sum(reduce(nll[i : i + 1], mask[i : i + 1], n_tokens=n) for i in range(4))
    torch.testing.assert_close(parts, full)


def test_token_and_sample_weights():
    logits, labels = _batch(seed=2)
    nll, mask = token_losses(logits, labels)
    tw = torch.rand_like(nll)
    sw = torch.tensor([0.5, 1.0, 2.0])
    got = reduce(nll, mask, tw, sw, n_tokens=10.0)
    want = sum(nll[b, t] * tw[b, t] * sw[b] for b in range(3) for t in range(6) if mask[b, t]) / 10
    torch.testing.assert_close(got, want)


def test_sequence_mean():
    logits, labels = _batch(seed=3)
    nll, mask = token_losses(logits, labels)
    got = sequence_mean(nll, mask)
    for b in range(3):
        torch.testing.assert_close(got[b], nll[b][mask[b]].mean())


def test_the_base_hooks_do_nothing():
    loss = Loss()
    assert loss.prepare(None, [{}, {}]) == [None, None]
    assert loss.after_step(None) is None and loss.on_resume(None) is None
    assert loss.diagnostics(None) == {} and loss.state_dict() == {}
    loss.load_state_dict({})
    with pytest.raises(NotImplementedError):
        loss(*_batch())


@pytest.mark.parametrize("name", ["sft", "dft", "cadft"])
def test_every_built_in_loss_follows_the_contract(name):
    cls = LOSSES[name]
    assert issubclass(cls, Loss) and all(callable(getattr(cls, h)) for h in HOOKS)
    loss = cls(cls.Config() if cls.Config else None)
    logits, labels = _batch()
    terms = loss(logits, labels, None)
    assert terms.per_token.shape == terms.mask.shape == (3, 6)
