"""Micro-batches filled by a token budget (train.micro_batch_tokens): within the budget, the
same number of forwards on every rank, and the same step as one micro-batch."""

import numpy as np
import pytest
import torch

from mixtune import config
from mixtune.data.sampler import token_shard
from mixtune.engine import step as step_mod
from mixtune.engine.loop import Trainer
from mixtune.errors import ConfigError


def _cost(lengths, members, packed):
    n = [lengths[i] for i in members]
    return sum(n) if packed else len(n) * max(n)


@pytest.mark.parametrize("packed", [True, False])
def test_token_shard_keeps_the_budget_covers_each_block_and_evens_out_ranks(packed):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, 32).tolist()
    lengths[5] = 100  # longer than the budget: alone
    budget, world = 60, 2
    cuts = [token_shard(lengths, world, r, budget, packed) for r in range(world)]
    assert len(cuts[0]) == len(cuts[1])  # every rank runs the same number of forwards
    for r, mine in enumerate(cuts):
        flat = np.concatenate(mine).tolist()
        assert flat == list(range(r * 16, (r + 1) * 16))  # its block, in order, once
        for m in mine:
            assert len(m) >= 1
            assert len(m) == 1 or _cost(lengths, m, packed) <= budget
    assert [5] in [m.tolist() for m in cuts[0]]
    assert [len(c) for c in cuts] == [
        len(token_shard(lengths, world, r, budget, packed)) for r in range(world)
    ]  # deterministic
    # Padded rows cost rows x the longest: two of 10 and one of 30 are 90, not 50.
    assert [m.tolist() for m in token_shard([10, 10, 30], 1, 0, 50, False)] == [[0, 1], [2]]
    assert [m.tolist() for m in token_shard([10, 10, 30], 1, 0, 50, True)] == [[0, 1, 2]]


def test_a_rank_with_fewer_micro_batches_halves_its_largest():
    lengths = [50, 50, 50, 50, 5, 5, 5, 5]  # rank 0 needs 4 micro-batches, rank 1 one
    assert [m.tolist() for m in token_shard(lengths, 2, 1, 50, True)] == [[4], [5], [6], [7]]
    assert [m.tolist() for m in token_shard(lengths, 2, 0, 50, True)] == [[0], [1], [2], [3]]
    lengths = [50, 50, 45, 5, 5, 5, 5, 5]  # rank 0: [50] [50] [45, 5]; rank 1 halves twice
    assert [m.tolist() for m in token_shard(lengths, 2, 0, 50, True)] == [[0], [1], [2, 3]]
    assert [m.tolist() for m in token_shard(lengths, 2, 1, 50, True)] == [[4], [5], [6, 7]]


def _one_step(make_config, tmp_path, name, packing, *overrides):
    """Grads, grad norm, per-dataset sums and parameters after one step on a fixed batch,
    and how many micro-batches it ran."""
    raw = make_config(max_steps=1)
    cfg = config.load(
        data=raw,
        overrides=[f"output_dir={tmp_path}/{name}", f"train.packing={packing}", *overrides],
    )
    trainer = Trainer(cfg)
    ds = np.array([0, 1, 0, 1, 1, 0, 0, 1])
    ex = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    grads, count = {}, [0]
    real_step = trainer.optimizer.step

    def spy_step(*a, **k):
        grads["g"] = [p.grad.detach().clone() for p in trainer.params]
        return real_step(*a, **k)

    real_collate, real_pack = step_mod.collate, step_mod.pack

    def counted(fn):
        def wrapper(*a, **k):
            count[0] += 1
            return fn(*a, **k)

        return wrapper

    trainer.optimizer.step = spy_step
    step_mod.collate, step_mod.pack = counted(real_collate), counted(real_pack)
    try:
        stats = trainer.train_step(ds, ex)
    finally:
        step_mod.collate, step_mod.pack = real_collate, real_pack
    params = [p.detach().clone() for p in trainer.params]
    return grads["g"], stats, params, count[0]


@pytest.mark.parametrize("packing", ["true", "false"])
def test_a_step_filled_by_tokens_equals_the_one_micro_batch_step(make_config, tmp_path, packing):
    whole = _one_step(make_config, tmp_path, "whole", packing, "train.micro_batch_size=8")
    split = _one_step(make_config, tmp_path, "split", packing, "train.micro_batch_tokens=40")
    assert whole[3] == 1 and split[3] >= 3  # the budget really split the step
    for a, b in zip(whole[0], split[0]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split[1].grad_norm, whole[1].grad_norm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split[1].per_dataset, whole[1].per_dataset, atol=1e-5, rtol=1e-6)
    for a, b in zip(whole[2], split[2]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_bad_combinations_are_config_errors(make_config):
    raw = make_config()
    with pytest.raises(ConfigError, match="give one of them"):
        config.load(data=raw, overrides=["train.micro_batch_tokens=64", "train.micro_batch_size=2"])
    with pytest.raises(ConfigError, match="train.micro_batch_tokens: must be >= 1"):
        config.load(data=raw, overrides=["train.micro_batch_tokens=0"])
    with pytest.raises(ConfigError, match="CADFT.*micro_batch_tokens"):
        config.load(
            data=make_config(loss={"name": "cadft"}), overrides=["train.micro_batch_tokens=64"]
        )
