"""CADFT: weights, global z-scoring (split invariance), beta = 0 == DFT, reductions, options."""

import contextlib
import json
import types

import numpy as np
import pytest
import torch

from mixtune import config
from mixtune.data.collate import collate
from mixtune.engine.loop import Trainer
from mixtune.errors import ConfigError
from mixtune.losses.cadft import CADFT, RewriteConfig, zscore_weights
from mixtune.losses.core import IGNORE, reduce, sequence_mean
from mixtune.losses.dft import dft

V = 16


class NextTokenModel(torch.nn.Module):
    """Logits depend only on the current token (so padding cannot matter): predicts t + 1."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, V)
        with torch.no_grad():
            self.emb.weight.copy_(4.0 * torch.roll(torch.eye(V), 1, dims=1))

    def forward(self, input_ids, attention_mask=None):
        return types.SimpleNamespace(logits=self.emb(input_ids))  # (B, T, V)


def _examples(n=8, corrupt=(2, 5)):
    """Counting sequences (compatible with the model) except ``corrupt`` (random targets)."""
    rng = np.random.default_rng(0)
    ids, labels = [], []
    for i in range(n):
        length = 6 + i % 3
        x = (np.arange(length) + i) % V
        if i in corrupt:
            x[3:] = rng.integers(0, V, length - 3)
        lab = x.copy()
        lab[:3] = IGNORE
        ids.append(x.astype(np.int64))
        labels.append(lab.astype(np.int64))
    return ids, labels


def _fake_trainer(micro):
    acc = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    return types.SimpleNamespace(model=NextTokenModel(), world=1, rank=0, micro=micro, acc=acc)


def _batches(ids, labels, micro):
    out = []
    for s in range(0, len(ids), micro):
        b = collate(ids[s : s + micro], labels[s : s + micro], 0, np.zeros(len(ids[s : s + micro])))
        b["index"] = torch.arange(s, s + len(ids[s : s + micro]))
        out.append(b)
    return out


def _opts(**kw):
    return CADFT.Config(rewrite=RewriteConfig(enabled=False), **kw)


def test_weights_at_most_one_and_exactly_one_at_or_below_the_mean():
    c = torch.tensor([0.5, 1.0, 1.5, 2.0, 6.0], dtype=torch.float64)
    s1, s2, n = float(c.sum()), float((c * c).sum()), 5.0
    z, w = zscore_weights(c, s1, s2, n, beta=1.0, eps=1e-6)
    ref = (c.numpy() - c.numpy().mean()) / (c.numpy().std() + 1e-6)  # population std
    np.testing.assert_allclose(z.numpy(), ref, rtol=1e-12)
    assert (w <= 1).all() and (w[z <= 0] == 1).all() and (w[z > 0] < 1).all()
    torch.testing.assert_close(w, torch.exp(-z.clamp(min=0)))
    assert (torch.diff(w) <= 0).all()  # less compatible -> never more weight
    _, w0 = zscore_weights(c, s1, s2, n, beta=0.0, eps=1e-6)
    assert (w0 == 1).all()
    _, w1 = zscore_weights(c[:1], float(c[0]), float(c[0] ** 2), 1.0, beta=1.0, eps=1e-6)
    assert (w1 == 1).all()  # a batch of one: z = 0


@pytest.mark.parametrize("stats", ["global", "micro_batch"])
def test_incompatible_samples_are_down_weighted(stats):
    ids, labels = _examples()
    trainer, loss = _fake_trainer(8), CADFT(_opts(stats=stats))
    (batch,) = _batches(ids, labels, 8)
    (extra,) = loss.prepare(trainer, [batch])
    terms = loss(trainer.model(batch["input_ids"]).logits, batch["labels"], extra)
    w = terms.sample_weights
    assert w[[2, 5]].max() < 0.5 and (w[[0, 1, 3, 4, 6, 7]] == 1).all()


def test_global_zscore_is_invariant_to_the_micro_batch_split():
    ids, labels = _examples()
    weights = {}
    for micro in (1, 2, 4, 8):
        trainer, loss = _fake_trainer(micro), CADFT(_opts())
        extras = loss.prepare(trainer, _batches(ids, labels, micro))
        pos = torch.cat([x["pos"] for x in extras])
        weights[micro] = torch.cat([x["w"] for x in extras])[torch.argsort(pos)]
    for micro in (1, 2, 4):
        torch.testing.assert_close(weights[micro], weights[8], rtol=1e-12, atol=1e-12)
    assert weights[8].min() < 1


def test_sample_mean_reduction():
    ids, labels = _examples()
    trainer, loss = _fake_trainer(4), CADFT(_opts(reduction="sample_mean"))
    batches = _batches(ids, labels, 4)
    extras = loss.prepare(trainer, batches)
    n_step = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    got, want = 0.0, 0.0
    for b, x in zip(batches, extras):
        logits = trainer.model(b["input_ids"]).logits
        t = loss(logits, b["labels"], x)
        got += reduce(t.per_token, t.mask, t.token_weights, t.sample_weights, n_step)
        d = dft(logits, b["labels"])
        per_sample = sequence_mean(d.per_token * d.token_weights, d.mask)
        want += (x["w"] * per_sample.double()).sum() / len(ids)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"beta": -1}, "loss.beta"),
        ({"eps": 0}, "loss.eps"),
        ({"stats": "rank"}, "loss.stats"),
        ({"rewrite": {"fraction": 0}}, "loss.rewrite.fraction"),
        ({"rewrite": {"prob": 1.5}}, "loss.rewrite.prob"),
        ({"rewrite": {"ema": 1}}, "loss.rewrite.ema"),
        ({"rewriter": {"top_p": 0}}, "loss.rewriter.top_p"),
        ({"rewriter": {"temperature": 0}}, "loss.rewriter.temperature"),
        ({"rewriter": {"nucleus": 0.9}}, "loss.rewriter.nucleus"),
    ],
)
def test_bad_options_name_the_field(make_config, bad, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config.load(data=make_config(loss={"name": "cadft", **bad}))


# -- in the training loop ------------------------------------------------------------------------
def _run(make_config, tmp_path, name, loss, micro=8, steps=3):
    raw = make_config(max_steps=steps, loss=loss, evals=[])
    # Padded rows in every run, so a DFT run is bit-comparable with it.
    raw["train"].update(eval_every=0, log_every=1, micro_batch_size=micro, packing=False)
    trainer = Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/{name}"]))
    trainer.run()
    return trainer


def test_beta_zero_is_exactly_dft(make_config, tmp_path):
    ref = _run(make_config, tmp_path, "dft", {"name": "dft"}, micro=4)
    got = _run(
        make_config,
        tmp_path,
        "cadft",
        {"name": "cadft", "beta": 0.0, "rewrite": {"enabled": False}},
        micro=4,
    )
    for a, b in zip(ref.params, got.params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_runs_do_not_depend_on_the_split(make_config, tmp_path, monkeypatch):
    seen: dict[int, list] = {}
    prepare = CADFT.prepare

    def spy(self, trainer, batches):
        extras = prepare(self, trainer, batches)
        for x in extras:
            w = x["w"] if "w" in x else torch.ones(len(x["pos"]))
            seen[trainer.micro].extend(zip([trainer.step] * len(w), x["pos"].tolist(), w.tolist()))
        return extras

    monkeypatch.setattr(CADFT, "prepare", spy)
    runs = {}
    for micro in (1, 2):
        seen[micro] = []
        runs[micro] = _run(make_config, tmp_path, f"m{micro}", {"name": "cadft"}, micro=micro)
    a, b = np.array(sorted(seen[1])), np.array(sorted(seen[2]))
    # fp32 forwards of padded vs unpadded sequences differ by ~1e-7 in c; z divides by a small
    # sigma, so the weights agree to ~1e-5 (exactly, up to 1e-12, with the padding-free model).
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert (a[:, 2] < 1).any()
    for p, q in zip(runs[1].params, runs[2].params):  # Adam at lr 3e-3 amplifies ~1e-5 noise
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5)


def test_cheap_micro_batch_mode_depends_on_the_split(make_config, tmp_path):
    # A deviation by design: one-sample micro-batches have z = 0, so CADFT degenerates to DFT.
    one = _run(
        make_config,
        tmp_path,
        "c1",
        {"name": "cadft", "stats": "micro_batch", "rewrite": {"enabled": False}},
        micro=1,
        steps=2,
    )
    ref = _run(make_config, tmp_path, "d1", {"name": "dft"}, micro=1, steps=2)
    for a, b in zip(one.params, ref.params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class ProbingUniform:
    """Test mixer: probes dataset 0 for one branch step at every step, then stays uniform."""

    Config = None

    def __init__(self, options, datasets, domains, seed):
        self.k = len(datasets)

    def update_steps(self, max_steps):
        return list(range(max_steps))

    def propose(self, ctx):
        ctx.probe(0, 1, 1)
        return np.full(self.k, 1 / self.k)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_probing_branch_steps_do_not_reach_the_moving_averages(make_config, tmp_path, monkeypatch):
    from mixtune.registry import MIXERS

    monkeypatch.setitem(MIXERS, "probing", ProbingUniform)
    loss = {
        "name": "cadft",
        "rewrite": {"min_visits": 1, "fraction": 0.05},
        "rewriter": {"max_new_tokens": 4},
    }
    runs = {}
    for mixer in ("uniform", "probing"):
        raw = make_config(max_steps=4, loss=loss, evals=[], mixer={"name": mixer})
        raw["train"].update(eval_every=0, log_every=2, micro_batch_size=4)
        runs[mixer] = Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/{mixer}"]))
        runs[mixer].run()
    a, b = (runs[m].loss_fn.rewriter.state_dict() for m in ("uniform", "probing"))
    assert a["table"] == b["table"] and len(a["records"]) == len(b["records"]) > 0
    logs = [
        [json.loads(x).get("loss") for x in open(tmp_path / m / "metrics.jsonl")]
        for m in ("uniform", "probing")
    ]
    assert logs[0] == logs[1]


# -- two processes -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_match_one(make_config, tmp_path):
    """Global statistics and the rewrite table are all-reduced/gathered over ranks: a 2-process
    run (2 micro-batches of 2 per rank) equals 1 process (4 micro-batches of 2)."""
    import json
    import shutil

    from helpers import torchrun

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not available")
    loss = {
        "name": "cadft",
        "rewrite": {"min_visits": 1, "fraction": 0.05},
        "rewriter": {"max_new_tokens": 6},
    }
    raw = make_config(max_steps=6, loss=loss, evals=[])
    raw["train"].update(batch_size=8, micro_batch_size=2, eval_every=0, log_every=2)
    raw["output_dir"] = str(tmp_path / "dist")
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    proc = torchrun(__file__, tmp_path / "cfg.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/single"]))
    single.run()
    flat = torch.cat([p.detach().flatten() for p in single.params])
    torch.testing.assert_close(flat, torch.load(tmp_path / "dist/params.pt"), rtol=1e-4, atol=2e-5)
    texts = [
        [(r["step"], r["example"], r["new_text"]) for r in map(json.loads, open(p))]
        for p in (tmp_path / "dist/rewrites.jsonl", tmp_path / "single/rewrites.jsonl")
    ]
    assert texts[0] == texts[1] and len(texts[0]) > 0
    m = [json.loads(x) for x in open(tmp_path / "dist/metrics.jsonl")][-1]["loss"]
    s = [json.loads(x) for x in open(tmp_path / "single/metrics.jsonl")][-1]["loss"]
    assert m["w_mean"] == pytest.approx(s["w_mean"], rel=1e-4) and m["w_min"] < 1


if __name__ == "__main__":  # the worker of test_two_processes_match_one (under torchrun)
    import json
    import sys
    from pathlib import Path

    torch.set_num_threads(1)
    trainer = Trainer(config.load(data=json.load(open(sys.argv[1]))))
    trainer.run()
    assert trainer.world == 2
    if trainer.rank == 0:
        flat = torch.cat([p.detach().flatten() for p in trainer.params])
        torch.save(flat, Path(trainer.cfg.output_dir) / "params.pt")
    from helpers import leave_distributed

    leave_distributed()
