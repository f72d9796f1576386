"""Streaming datasets: same batches as in memory, exact resume, exhaustion, sources, limits."""

import gzip
import json

import numpy as np
import pytest
import torch

from conftest import addition_records, reverse_records, write_jsonl
from helpers import ChaseLoss
from mixtune import config
from mixtune.data import streaming
from mixtune.data.bytetok import byte_tokenizer
from mixtune.data.domains import _perm
from mixtune.data.sampler import MixtureSampler, SamplerExhausted
from mixtune.engine import probe
from mixtune.engine.loop import Trainer
from mixtune.engine.rundir import read_metrics
from mixtune.errors import ConfigError
from mixtune.registry import MIXERS


@pytest.fixture
def chase_mixer(monkeypatch):
    monkeypatch.setitem(MIXERS, "chase", ChaseLoss)


@pytest.fixture
def shards(tmp_path):
    """50 addition records in 3 shards: plain, plain, gzip."""
    d = tmp_path / "shards"
    d.mkdir()
    recs = addition_records(50, seed=5)
    write_jsonl(d / "part-0.jsonl", recs[0::3])
    write_jsonl(d / "part-1.jsonl", recs[1::3])
    with gzip.open(d / "part-2.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs[2::3])
    return d


def _config(tmp_path, name, add, **extra):
    raw = {
        "output_dir": str(tmp_path / name),
        "seed": 0,
        "max_steps": 10,
        "progress": False,
        "model": {
            "tokenizer": "byte",
            "config": {
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "max_position_embeddings": 256,
            },
        },
        "datasets": [
            add,
            {"name": "rev", "path": write_jsonl(tmp_path / "rev.jsonl", reverse_records(30))},
        ],
        "evals": [],
        "mixer": {"name": "uniform"},
        "train": {
            "batch_size": 8,
            "lr": 3e-3,
            "max_length": 64,
            "eval_every": 0,
            "log_every": 1,
            "save_every": 0,
        },
    }
    raw.update(extra)
    return raw


def _sampler(cfg):
    train, _ = streaming.build(cfg, byte_tokenizer())
    return train, MixtureSampler(
        [t.size for t in train],
        [t.name for t in train],
        [1 / len(train)] * len(train),
        cfg.seed,
        [t.repeat for t in train],
        streaming.streams_of(train),
    )


def _strip(record):
    """Without wall-clock fields (``time``, ``*seconds*``)."""
    if isinstance(record, list):
        return [_strip(r) for r in record]
    if isinstance(record, dict):
        return {k: _strip(v) for k, v in record.items() if k != "time" and "seconds" not in k}
    return record


def _record_batches(monkeypatch):
    """Log (dataset, example id, token ids) of every real training step."""
    seen = []
    inner = Trainer.train_step

    def train_step(self, ds, ex):
        seen.append(
            [(int(k), int(e), bytes(self.train_sets[k].data.input_ids[e])) for k, e in zip(ds, ex)]
        )
        return inner(self, ds, ex)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return seen


# ----------------------------------------------------------------------------------------------
def test_stream_with_a_whole_dataset_block_equals_in_memory_run(tmp_path, chase_mixer):
    recs = addition_records(40)
    mem = _config(
        tmp_path,
        "mem",
        {"name": "add", "path": write_jsonl(tmp_path / "add.jsonl", recs)},
        mixer={"name": "chase"},
    )
    # the stream's file holds the examples in the in-memory path's order (its load shuffle),
    # and one block covers the dataset: its permutation is the in-memory sampler's pass
    ordered = [recs[i] for i in _perm(0, "add", len(recs))]
    path = write_jsonl(tmp_path / "ordered.jsonl", ordered)
    stream = _config(
        tmp_path,
        "stream",
        {"name": "add", "path": path, "streaming": True, "shuffle_buffer": 64},
        mixer={"name": "chase"},
    )
    a, b = Trainer(config.load(data=mem)), Trainer(config.load(data=stream))
    assert isinstance(b.train_sets[0], streaming.StreamSet)
    a.run(), b.run()
    assert b.counters["drawn"][0] > 40  # the stream went into a second epoch
    for x, y in zip(a.params, b.params):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert _strip(read_metrics(tmp_path / "mem")) == _strip(read_metrics(tmp_path / "stream"))


def test_sharded_stream_each_epoch_is_the_dataset_and_seeded(tmp_path, shards):
    def draws(seed, path):
        cfg = config.load(
            data=_config(
                tmp_path,
                "x",
                {"name": "add", "path": path, "streaming": True, "shuffle_buffer": 8},
                seed=seed,
            )
        )
        train, s = _sampler(cfg)
        s.set_weights([1.0, 0.0])
        out = []
        for _ in range(10):
            _, ex = s.next_batch(10)
            out += [bytes(train[0].data.input_ids[e]) for e in ex]
        return out

    first = draws(0, str(shards))
    expected = sorted(bytes(x) for x in _in_memory_ids(addition_records(50, seed=5)))
    assert sorted(first[:50]) == expected and sorted(first[50:100]) == expected
    assert first[:50] != first[50:100]  # each epoch reshuffles
    assert draws(0, str(shards / "part-*")) == first  # a glob names the same shards
    assert draws(1, str(shards)) != first


def _in_memory_ids(recs):
    from mixtune.data.formats import normalize
    from mixtune.data.template import DEFAULT_CHAT_TEMPLATE
    from mixtune.data.tokenize import tokenize

    return tokenize(
        normalize(recs, "auto", None, "t"), byte_tokenizer(), 64, DEFAULT_CHAT_TEMPLATE, "t"
    ).input_ids


@pytest.mark.parametrize(
    "mixer", [{"name": "chase"}, {"name": "dynamixsft", "update_every": 2, "batch_size": 4}]
)
def test_streaming_resume_equals_uninterrupted(tmp_path, shards, chase_mixer, monkeypatch, mixer):
    seen = _record_batches(monkeypatch)
    add = {"name": "add", "path": str(shards), "streaming": True, "shuffle_buffer": 8}
    raw = _config(tmp_path, "full", add, mixer=mixer)
    full = Trainer(config.load(data=raw))
    full.run()
    full_seen = list(seen)
    seen.clear()
    split = dict(raw, output_dir=str(tmp_path / "split"))
    Trainer(config.load(data=split)).run(stop_after=5)
    resumed = Trainer(config.load(data=split))
    assert resumed.resume_from is not None
    resumed.run()
    for x, y in zip(full.params, resumed.params):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert seen == full_seen  # the same (dataset, example, tokens) at every step
    assert _strip(read_metrics(tmp_path / "full")) == _strip(read_metrics(tmp_path / "split"))
    metrics = read_metrics(tmp_path / "full")
    assert len({r["weights"]["add"] for r in metrics}) > 2, "the mixer must move the weights"
    assert metrics[-1]["drawn"]["add"] > 50  # the stream crossed an epoch boundary


def test_non_repeating_stream_is_exhausted_like_in_memory(tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", addition_records(5))
    cfg = config.load(
        data=_config(
            tmp_path, "x", {"name": "add", "path": small, "streaming": True, "repeat": False}
        )
    )
    train, s = _sampler(cfg)
    s.set_weights([0.9, 0.1])
    drawn = np.concatenate([s.next_batch(10)[0] for _ in range(5)])
    assert (drawn == 0).sum() == 5 and s.exhausted[0]
    only = config.load(
        data={
            "datasets": [{"name": "add", "path": small, "streaming": True, "repeat": False}],
            "model": {"tokenizer": "byte"},
        }
    )
    _, s2 = _sampler(only)
    s2.next_batch(4)
    with pytest.raises(SamplerExhausted, match="repeat: true"):
        s2.next_batch(4)


def test_hub_stream_from_local_file_resumes_exactly(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "hub.jsonl", addition_records(30))

    def factory():
        return datasets.load_dataset("json", data_files=path, split="train", streaming=True)

    def stream():
        tok, src = byte_tokenizer(), streaming.HubSource(factory, "datasets.hub")
        from mixtune.data.formats import normalize
        from mixtune.data.template import DEFAULT_CHAT_TEMPLATE
        from mixtune.data.tokenize import tokenize

        def tokenise(recs):
            return tokenize(normalize(recs, "auto", None, "t"), tok, 64, DEFAULT_CHAT_TEMPLATE, "t")

        return streaming.Stream(src, 0, 0, 8, True, tokenise)

    a = stream()
    assert src_count(factory) == 30
    first = [bytes(a.cache[e][0]) for e in a.take(13, True)]
    state = json.loads(json.dumps(a.state_dict()))  # as checkpointed
    rest = [bytes(a.cache[e][0]) for e in a.take(30, True)]
    b = stream()
    b.load_state_dict(state)
    assert [bytes(b.cache[e][0]) for e in b.take(30, True)] == rest
    assert sorted(first + rest[:17]) == sorted(
        bytes(x) for x in _in_memory_ids(addition_records(30))
    )


def src_count(factory):
    return streaming.HubSource(factory, "t").count()


def test_hub_streaming_config_trains(tmp_path, chase_mixer):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(addition_records(20)).to_parquet(str(tmp_path / "a.parquet"))
    raw = _config(
        tmp_path,
        "hub",
        {"name": "add", "path": str(tmp_path / "a.parquet"), "streaming": True},
        max_steps=3,
    )
    trainer = Trainer(config.load(data=raw))
    assert isinstance(trainer.train_sets[0].stream.source, streaming.HubSource)
    assert trainer.run()["steps"] == 3 and trainer.counters["drawn"][0] > 0


def test_features_needing_random_access_are_refused(tmp_path):
    add = {
        "name": "add",
        "path": write_jsonl(tmp_path / "a.jsonl", addition_records(10)),
        "streaming": True,
    }
    cases = {
        "loss.rewrite.enabled": {"loss": {"name": "cadft"}},
        "mixer.reward": {"mixer": {"name": "dynamixsft", "reward": "progress"}},
        "evals.held.from_dataset": {"evals": [{"name": "held", "from_dataset": "add"}]},
    }
    for field, extra in cases.items():
        with pytest.raises(ConfigError, match=field):
            streaming.build(
                config.load(data=_config(tmp_path, "x", add, **extra)), byte_tokenizer()
            )
    ok = {"loss": {"name": "cadft", "rewrite": {"enabled": False}}}  # batch-level weights only
    train, _ = streaming.build(
        config.load(data=_config(tmp_path, "x", add, **ok)), byte_tokenizer()
    )
    with pytest.raises(ConfigError, match="shuffle_buffer"):
        config.load(data=_config(tmp_path, "x", dict(add, streaming=False, shuffle_buffer=4)))


def test_probe_on_a_stream_restores_its_position(tmp_path, shards, chase_mixer):
    add = {"name": "add", "path": str(shards), "streaming": True, "shuffle_buffer": 8}
    a = Trainer(config.load(data=_config(tmp_path, "a", add)))
    c = Trainer(config.load(data=_config(tmp_path, "c", add)))
    for t in (a, c):
        t.run(stop_after=3)
    before = a.sampler.state_dict()
    probe.probe(a.state, 0, steps=4)  # 32 examples of the stream: several blocks further on
    assert a.sampler.state_dict() == before
    la = probe.lookahead(a.state, 0, batch_size=4)  # drawn from the current block
    assert a.sampler.state_dict() == before and len(la.pre) == 4
    (da, ea), (dc, ec) = a.sampler.next_batch(8), c.sampler.next_batch(8)
    assert np.array_equal(da, dc) and np.array_equal(ea, ec)
    assert all(
        np.array_equal(a.train_sets[k].data.input_ids[e], c.train_sets[k].data.input_ids[e])
        for k, e in zip(da, ea)
    )


def test_memory_holds_one_block_and_one_step(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", addition_records(3000))
    cfg = config.load(
        data={
            "datasets": [{"name": "big", "path": path, "streaming": True, "shuffle_buffer": 32}],
            "model": {"tokenizer": "byte"},
        }
    )
    train, s = _sampler(cfg)
    peak = 0
    for _ in range(400):  # 4000 draws: more than one epoch
        s.next_batch(10)
        peak = max(peak, len(train[0].stream.cache))
    assert peak <= 32 + 10 + 32
    assert train[0].size == 3000
