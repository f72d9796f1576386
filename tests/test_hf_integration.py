"""MixtureDataset + MixtureCallback inside HF Trainer (and TRL SFTTrainer when installed).

Known-answer setup: "learn" sequences count upward (next token = previous + 1: learnable in a
few steps), "noise" sequences are uniform random tokens (nothing to learn). Token ranges do not
overlap (learn: 1..31, noise: 32..62), so every row of a batch tells which dataset it came from.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from mixtune.errors import ConfigError, DataError, MixtuneError  # noqa: E402
from mixtune.integrations import MixtureCallback, MixtureDataset  # noqa: E402

transformers.logging.set_verbosity_error()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps a process-wide singleton state; the HF ``Trainer`` of these tests (its
    own precision settings) must not leak it into later tests' ``Accelerator``."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def toy_data(n: int = 64, length: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    learn = [
        {"input_ids": ((np.arange(length) + rng.integers(31)) % 31 + 1).tolist()} for _ in range(n)
    ]
    noise = [{"input_ids": rng.integers(32, 63, length).tolist()} for _ in range(n)]
    return {"learn": learn, "noise": noise}


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            pad_token_id=0,
        )
    )


def make_trainer(
    tmp_path, mixer, options=None, steps=20, micro=8, ga=1, model=None, mix=None, callbacks=(), **kw
):
    mix = mix or MixtureDataset(toy_data(), seed=0)
    cb = MixtureCallback(mix, mixer, options, metrics_path=str(tmp_path / "metrics.jsonl"))
    args = TrainingArguments(
        str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=ga,
        learning_rate=3e-3,
        logging_steps=5,
        save_strategy=kw.pop("save_strategy", "no"),
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **kw,
    )
    trainer = Trainer(
        model or tiny_model(),
        args,
        train_dataset=mix,
        data_collator=mix.collate,
        callbacks=[cb, *callbacks],
    )
    return trainer, mix, cb


def mix_records(trainer) -> list[dict]:
    return [r for r in trainer.state.log_history if any(k.startswith("mixtune/") for k in r)]


class RowChecker(transformers.TrainerCallback):
    """Counts the rows of every training forward by their token range (learn < 32 <= noise)."""

    def __init__(self):
        self.counts = np.zeros(2, np.int64)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, a, kw, out):
            if module.training and torch.is_grad_enabled():
                ids = kw["input_ids"]
                self.counts += [int((ids[:, 0] < 32).sum()), int((ids[:, 0] >= 32).sum())]

        self.handle = model.register_forward_hook(hook, with_kwargs=True)


def test_static_mixture_samples_given_proportions_and_logs(tmp_path):
    rows = RowChecker()
    trainer, mix, cb = make_trainer(
        tmp_path,
        "fixed",
        {"weights": {"learn": 3, "noise": 1}},
        steps=40,
        micro=4,
        ga=2,
        callbacks=[rows],
    )
    trainer.train()
    # 320 examples at p = 0.75: sd 0.024, the bound is 4 sd
    assert abs(rows.counts[0] / rows.counts.sum() - 0.75) < 0.1
    # the callback's ledger saw exactly what the model was fed
    assert cb.seen.tolist() == rows.counts.tolist()
    first = mix_records(trainer)[0]
    assert first["step"] == 0
    assert first["mixtune/weight/learn"] == pytest.approx(0.75)
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert line["weights"] == pytest.approx({"learn": 0.75, "noise": 0.25})


def test_dynamixsft_moves_weight_to_the_learnable_dataset(tmp_path):
    trainer, mix, cb = make_trainer(tmp_path, "dynamixsft", {"update_every": 5}, steps=30)
    trainer.train()
    recs = mix_records(trainer)
    assert [r["step"] for r in recs] == [0, 5, 10, 15, 20, 25]
    w = [r["mixtune/weight/learn"] for r in recs]
    assert w[0] == pytest.approx(0.5)
    assert all(b > a for a, b in zip(w, w[1:])), w  # reward favours "learn" at every update
    assert all(r["mixtune/reward/learn"] > r["mixtune/reward/noise"] for r in recs[1:])
    # weights take effect from the batch after the next one (the loader reads one ahead)
    assert mix.schedule[1][0] == 6


def test_exp3_upweights_the_dataset_with_higher_training_loss(tmp_path):
    # EXP3/ODM rewards high training loss: the noise dataset (loss stays near ln 31) wins.
    trainer, mix, cb = make_trainer(
        tmp_path, "exp3", {"update_every": 2, "warmup_steps": 0}, steps=30
    )
    trainer.train()
    recs = mix_records(trainer)
    last = recs[-1]
    assert last["mixtune/train_loss/noise"] > last["mixtune/train_loss/learn"] + 0.3
    assert last["mixtune/weight/noise"] > 0.51
    assert last["mixtune/reward_estimate/noise"] > last["mixtune/reward_estimate/learn"]


class _LookThenStay:
    """Test mixer: runs both look-ahead kinds every 2 steps, always returns uniform weights."""

    Config = None

    def __init__(self):
        self.calls = 0

    def update_steps(self, max_steps):
        return list(range(0, max_steps, 2))

    def propose(self, ctx):
        if ctx.step > 0:
            for j in range(len(ctx.datasets)):
                for kind in ("sgd", "adam"):
                    res = ctx.lookahead(j, optimizer=kind, key=ctx.step)
                    assert np.all(np.isfinite(res.post))
            self.calls += 1
        return np.full(len(ctx.datasets), 0.5)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_lookahead_restores_the_trainer_bit_identically(tmp_path):
    plain, _, _ = make_trainer(tmp_path / "a", "uniform", steps=8)
    plain.train()
    mixer = _LookThenStay()
    probed, _, _ = make_trainer(tmp_path / "b", mixer, steps=8)
    probed.train()
    assert mixer.calls == 3
    for (n, p), q in zip(plain.model.named_parameters(), probed.model.parameters()):
        assert torch.equal(p, q), n


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    opts = {"update_every": 2, "warmup_steps": 0}
    full, _, _ = make_trainer(tmp_path / "full", "exp3", opts, steps=8)
    full.train()

    class StopAt3(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step == 3

    # step 3 lies between updates (2, 4): the pending loss sums must survive the checkpoint
    first, _, _ = make_trainer(
        tmp_path / "cut",
        "exp3",
        opts,
        steps=8,
        callbacks=[StopAt3()],
        save_strategy="steps",
        save_steps=3,
    )
    first.train()
    again, _, _ = make_trainer(
        tmp_path / "cut", "exp3", opts, steps=8, save_strategy="steps", save_steps=3
    )
    again.train(resume_from_checkpoint=str(tmp_path / "cut" / "out" / "checkpoint-3"))

    def weights(tr):
        return {r["step"]: r["mixtune/weight/noise"] for r in mix_records(tr)}

    assert weights(again) == weights(full)  # log_history is restored, then extended
    for p, q in zip(full.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)


def test_mixers_that_need_mixtunes_loop_are_refused():
    mix = MixtureDataset(toy_data(8), seed=0)
    for name in ("dynamics", "proxymix"):
        with pytest.raises(ConfigError, match="mixtune train"):
            MixtureCallback(mix, name)
    with pytest.raises(ConfigError, match="unknown mixer"):
        MixtureCallback(mix, "nope")
    with pytest.raises(ConfigError, match="gamma"):
        MixtureCallback(mix, "dynamixsft", {"gamma": 2})
    with pytest.raises(DataError, match="no examples"):
        MixtureDataset({"a": []})
    with pytest.raises(MixtuneError, match="arrive after"):
        mix.start(4)
        mix.batch(3)
        mix.set_weights([0.5, 0.5], 2)


def test_trl_sft_trainer_runs_dynamixsft_with_loss_tracking(tmp_path):
    trl = pytest.importorskip("trl")
    from mixtune.data.bytetok import byte_tokenizer

    mix = MixtureDataset(toy_data(), seed=0)
    cb = MixtureCallback(mix, "dynamixsft", {"update_every": 3}, track_losses=True)
    args = trl.SFTConfig(
        str(tmp_path / "trl"),
        max_steps=9,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        logging_steps=3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = trl.SFTTrainer(
        model=tiny_model(),
        args=args,
        processing_class=byte_tokenizer(),
        train_dataset=mix.as_hf_dataset(),
        callbacks=[cb],
    )
    trainer.train()
    recs = mix_records(trainer)
    assert [r["step"] for r in recs] == [0, 3, 6]
    assert recs[-1]["mixtune/weight/learn"] > 0.5
    assert recs[-1]["mixtune/train_loss/noise"] > recs[-1]["mixtune/train_loss/learn"]
    assert cb.seen.sum() == 9 * 8


# --- 2 processes (torchrun, gloo): hf_dist_worker.py ------------------------------------------
HF_DIST = {
    # EXP3's per-dataset losses come from the row ledger: GA x ranks interleave rows
    "exp3_ga2": {
        "mixer": "exp3",
        "options": {"update_every": 2, "warmup_steps": 0},
        "micro": 2,
        "ga": 2,
    },
    # DynamixSFT's look-ahead on the DDP-wrapped model, gradient averaged over ranks
    "dynamixsft": {"mixer": "dynamixsft", "options": {"update_every": 2}, "micro": 4},
    "trl_exp3": {
        "mixer": "exp3",
        "options": {"update_every": 2, "warmup_steps": 0},
        "micro": 2,
        "ga": 2,
        "trl": True,
    },
}


@pytest.mark.dist
@pytest.mark.parametrize(
    "case", [c if c != "trl_exp3" else pytest.param(c, marks=pytest.mark.slow) for c in HF_DIST]
)
def test_two_processes_match_one(case, tmp_path):
    import shutil
    from collections import Counter
    from pathlib import Path

    from helpers import torchrun
    from hf_dist_worker import run

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not available")
    spec = dict(HF_DIST[case])
    if spec.get("trl"):
        pytest.importorskip("trl")
    spec.update(steps=8, dir=str(tmp_path / "two"))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = torchrun(
        Path(__file__).parent / "hf_dist_worker.py", tmp_path / "spec.json", tmp_path / "out.json"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "out.json").read_text())
    assert [g["world"] for g in two] == [2, 2]
    # Every rank computed the same weights (and diagnostics) at every update ...
    assert two[0]["records"] == two[1]["records"] and len(two[0]["records"]) == 4
    assert two[0]["params"] == two[1]["params"]
    # ... equal to one process on the same global batches (per-device batch doubled).
    one = run({**spec, "micro": spec["micro"] * 2, "dir": str(tmp_path / "one")})
    for a, b in zip(one["records"], two[0]["records"]):
        assert a.keys() == b.keys()
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), a["step"]
    assert [r["step"] for r in one["records"]] == [r["step"] for r in two[0]["records"]]
    assert one["seen"] == two[0]["seen"]
    # The two ranks' rows of each step are that step's global batch of the 1-process run.
    assert Counter((s, tuple(r)) for g in two for s, r in g["rows"]) == Counter(
        (s, tuple(r)) for s, r in one["rows"]
    )
    if not spec.get("trl"):  # TRL normalises its own loss per rank: its θ differs (docs)
        np.testing.assert_allclose(one["params"], two[0]["params"], rtol=1e-4, atol=1e-5)
    assert two[0]["records"][-1]["mixtune/weight/noise"] != 0.5, "the mixer never moved"
