"""Compatibility-guided rewriting: schedule, tokenisation, sampling, determinism and resume."""

import json

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL
from mixtune import config
from mixtune.data.bytetok import byte_tokenizer
from mixtune.data.formats import normalize
from mixtune.data.tokenize import resolve_template, tokenize
from mixtune.engine.loop import Trainer
from mixtune.losses.cadft import CADFT
from mixtune.losses.generation import retarget, sample
from mixtune.losses.rewrite import RewriteConfig, Rewriter, schedule


def test_schedule_scaled_and_absolute():
    assert schedule(RewriteConfig(), 200) == (60, 20)  # 30% of the run, then every 10%
    assert schedule(RewriteConfig(), 8) == (3, 1)
    assert schedule(RewriteConfig(schedule="absolute"), 200) == (3000, 1000)
    r = Rewriter(RewriteConfig(), None)
    due = [s for s in range(201) if r.due(s, 200)]
    assert due == [60, 80, 100, 120, 140, 160, 180]  # never at the last step


def test_retarget_tokenises_like_the_data_pipeline():
    tok = byte_tokenizer()
    template = resolve_template(tok, None)
    recs = [{"prompt": "What is 2+3?", "response": "five, i.e. 5"}]
    data = tokenize(normalize(recs, "auto", None, "t"), tok, 64, template, "t")
    pl = data.prompt_len[0]
    ids, labels = retarget(
        tok, template, data.input_ids[0][:pl], data.labels[0][:pl], "five, i.e. 5", 64
    )
    np.testing.assert_array_equal(ids, data.input_ids[0])
    np.testing.assert_array_equal(labels, data.labels[0])
    short, _ = retarget(tok, template, data.input_ids[0][:pl], data.labels[0][:pl], "x" * 99, 40)
    assert len(short) == 40


def _tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {k: v for k, v in TINY_MODEL.items() if k != "model_type"}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=40, **spec))


def test_sampling_is_seeded_and_leaves_the_global_rng_alone():
    model, prompt = _tiny_llama(), np.array([1, 2, 3])
    state = torch.get_rng_state()
    a = sample(model, prompt, 12, 0.9, 0.7, torch.Generator().manual_seed(5), eos_id=-1)
    b = sample(model, prompt, 12, 0.9, 0.7, torch.Generator().manual_seed(5), eos_id=-1)
    c = sample(model, prompt, 12, 0.9, 2.0, torch.Generator().manual_seed(6), eos_id=-1)
    assert a == b and a != c and len(a) == 12
    assert torch.equal(state, torch.get_rng_state())
    greedy = sample(model, prompt, 6, 1e-9, 0.7, torch.Generator().manual_seed(0), eos_id=-1)
    ref = model.generate(torch.from_numpy(prompt[None]), max_new_tokens=6, do_sample=False)
    assert greedy == ref[0, 3:].tolist()  # a vanishing nucleus is greedy decoding


# -- in the training loop ------------------------------------------------------------------------
LOSS = {
    "name": "cadft",
    "rewrite": {"min_visits": 1, "fraction": 0.05},
    "rewriter": {"max_new_tokens": 6},
}


def _raw(make_config, loss=LOSS, steps=6):
    raw = make_config(max_steps=steps, loss=loss, evals=[])
    raw["train"].update(eval_every=0, log_every=1, micro_batch_size=4)
    return raw


def _rewrites(path):
    return [json.loads(line) for line in open(path / "rewrites.jsonl")]


def test_rewriting_is_deterministic_and_resumes(make_config, tmp_path, monkeypatch):
    # 6 steps: rewrite events after steps 2, 3, 4, 5; 24 examples, so the first resumed step
    # draws rewritten examples: they must be re-applied (on_resume) before that step.
    loss = {**LOSS, "rewrite": {"min_visits": 1, "fraction": 0.25}}
    raw = _raw(make_config, loss)
    raw["train"]["log_every"] = 2  # the checkpoint falls between two log steps
    for d in raw["datasets"]:
        d["max_examples"] = 12
    resumed, on_resume = [], CADFT.on_resume
    monkeypatch.setattr(
        CADFT, "on_resume", lambda self, state: resumed.append(state.step) or on_resume(self, state)
    )
    full = Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/full"]))
    full.run()
    first = Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/split"]))
    first.run(stop_after=3)
    n_before = len(_rewrites(tmp_path / "split"))
    with open(tmp_path / "split/rewrites.jsonl", "a") as f:  # a crash after the checkpoint
        f.write(json.dumps({"step": 4, "stale": True}) + "\n")
    second = Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/split"]))
    drawn, step = [], second.train_step

    def spy(ds, ex):
        drawn.append(set(zip(ds.tolist(), ex.tolist())))
        return step(ds, ex)

    second.train_step = spy
    second.run()
    assert resumed == [3]

    a, b = _rewrites(tmp_path / "full"), _rewrites(tmp_path / "split")
    assert 0 < n_before < len(a), "rewrites must happen before and after the interruption"
    assert [(r["step"], r["dataset"], r["example"], r["old_text"], r["new_text"]) for r in a] == [
        (r["step"], r["dataset"], r["example"], r["old_text"], r["new_text"]) for r in b
    ]
    np.testing.assert_allclose([r["new_c"] for r in a], [r["new_c"] for r in b], rtol=1e-4)
    for k in range(2):  # the training data carries the same targets
        for x, y in zip(full.train_sets[k].data.labels, second.train_sets[k].data.labels):
            np.testing.assert_array_equal(x, y)
    for r in a:
        e, k = r["example"], full.names.index(r["dataset"])
        assert len(full.train_sets[k].data.labels[e]) > full.train_sets[k].data.prompt_len[e]
    restored = {(full.names.index(r["dataset"]), r["example"]) for r in a if r["step"] <= 3}
    assert restored & drawn[0], "the first resumed step must draw a restored rewrite"
    for p, q in zip(full.params, second.params):  # bit-identical to the uninterrupted run
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    logs = [
        [json.loads(x).get("loss") for x in open(tmp_path / d / "metrics.jsonl")]
        for d in ("full", "split")
    ]
    assert logs[0][-1]["rewrites"] == len(a) and logs[0][-1]["rewrite_events"] == 4
    assert logs[0] == logs[1]  # diagnostics accumulated across the checkpoint too


def test_another_model_rewrites_and_verify_rejects(make_config, tmp_path):
    model = _tiny_llama()
    model.resize_token_embeddings(len(byte_tokenizer()))
    model.save_pretrained(tmp_path / "rewriter")
    byte_tokenizer().save_pretrained(tmp_path / "rewriter")
    loss = {**LOSS, "rewriter": {"model": str(tmp_path / "rewriter"), "max_new_tokens": 4}}
    ext = Trainer(
        config.load(data=_raw(make_config, loss, steps=4), overrides=[f"output_dir={tmp_path}/ext"])
    )
    ext.run()
    assert len(_rewrites(tmp_path / "ext")) > 0
    # A random model never reproduces the reference answer: verification rejects everything.
    loss = {**LOSS, "rewrite": {**LOSS["rewrite"], "verify": True}}
    ver = Trainer(
        config.load(data=_raw(make_config, loss, steps=4), overrides=[f"output_dir={tmp_path}/ver"])
    )
    ver.run()
    last = [json.loads(x) for x in open(tmp_path / "ver/metrics.jsonl")][-1]["loss"]
    assert last["rewrites"] == 0 and last["rewrites_rejected"] > 0


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"every": 0}, "loss.rewrite.every"),
        ({"min_visits": 0}, "loss.rewrite.min_visits"),
        ({"schedule": "linear"}, "loss.rewrite.schedule"),
    ],
)
def test_bad_rewrite_options(make_config, bad, field):
    from mixtune.errors import ConfigError

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config.load(data=make_config(loss={"name": "cadft", "rewrite": bad}))
