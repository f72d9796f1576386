"""Training-path invariants: exact resume, exact gradient accumulation, NaN handling, LoRA."""

import json

import pytest
import torch

from helpers import ChaseLoss, adam_tol
from mixtune import config
from mixtune.engine.loop import Trainer
from mixtune.engine.rundir import read_metrics
from mixtune.errors import TrainingError
from mixtune.losses.base import Loss
from mixtune.registry import MIXERS


@pytest.fixture
def chase_mixer(monkeypatch):
    monkeypatch.setitem(MIXERS, "chase", ChaseLoss)


def _params(trainer):
    return [p.detach().clone() for p in trainer.params]


def _strip_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def test_resume_equals_uninterrupted(make_config, tmp_path, chase_mixer):
    raw = make_config(max_steps=10, mixer={"name": "chase"})
    raw["train"].update(save_every=0, eval_every=4, log_every=2)
    full = Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/full"]))
    full.run()
    first = Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/split"]))
    first.run(stop_after=5)
    assert (tmp_path / "split/checkpoints/step-000005/state.json").is_file()
    second = Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/split"]))
    assert second.resume_from is not None
    second.run()
    # the time the resumed process started with is the checkpoint's, and the run's total
    # includes it: a fresh run resumed nothing
    kept = json.loads((tmp_path / "split/checkpoints/step-000005/state.json").read_text())
    split = json.loads((tmp_path / "split/summary.json").read_text())
    assert split["resumed_seconds"] == round(kept["counters"]["elapsed"], 3) > 0
    assert split["seconds"] > split["resumed_seconds"]
    assert json.loads((tmp_path / "full/summary.json").read_text())["resumed_seconds"] == 0
    for a, b in zip(_params(full), _params(second)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ma, mb = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    assert _strip_time(ma) == _strip_time(mb)
    weights = [r["weights"]["add"] for r in ma]
    assert len(set(weights)) > 2, "the test mixer must actually move the weights"


@pytest.mark.parametrize("micro", [1, 2])
def test_gradient_accumulation_is_exact(make_config, tmp_path, micro):
    raw = make_config(max_steps=3)
    raw["train"].update(batch_size=8, eval_every=0)
    ref = Trainer(
        config.load(data=raw, overrides=[f"output_dir={tmp_path}/ref", "train.micro_batch_size=8"])
    )
    ref.run()
    acc = Trainer(
        config.load(
            data=raw,
            overrides=[f"output_dir={tmp_path}/acc{micro}", f"train.micro_batch_size={micro}"],
        )
    )
    acc.run()
    # The same update up to float rounding (the step's gradient summed in another order).
    for a, b in zip(_params(ref), _params(acc)):
        torch.testing.assert_close(a, b, **adam_tol(raw["train"]["lr"], steps=3))


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(make_config, tmp_path):
    raw = make_config(max_steps=6)
    raw["train"].update(save_every=2, eval_every=0, max_grad_norm=None)
    trainer = Trainer(config.load(data=raw))

    class Poisoned(Loss):
        """SFT, NaN after two calls: steps 1-2 fine (one micro-batch each), then NaN."""

        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __call__(self, logits, labels, extra=None):
            self.calls += 1
            terms = self.inner(logits, labels, extra)
            if self.calls > 2:
                terms.per_token = terms.per_token * float("nan")
            return terms

    trainer.loss_fn = Poisoned(trainer.loss_fn)
    with pytest.raises(TrainingError, match="non-finite loss/gradient at step 3"):
        trainer.run()
    ckpts = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert ckpts == ["step-000002"]
    state = json.loads((tmp_path / "run/checkpoints/step-000002/state.json").read_text())
    assert state["step"] == 2


def test_lora_trains_only_the_adapter(make_config, tmp_path):
    raw = make_config(max_steps=3)
    raw["model"]["lora"] = {"enabled": True, "r": 4, "alpha": 8}
    trainer = Trainer(config.load(data=raw))
    frozen = {
        n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad
    }
    adapters = {
        n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad
    }
    assert adapters and all("lora" in n for n in adapters)
    trainer.run()
    for n, p in trainer.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])
    assert any(
        not torch.equal(p, adapters[n])
        for n, p in trainer.model.named_parameters()
        if n in adapters and "lora_B" in n
    )
    assert (tmp_path / "run/final/adapter_config.json").is_file()


def test_run_directory_contents(make_config, tmp_path):
    Trainer(config.load(data=make_config(max_steps=4))).run()
    run = tmp_path / "run"
    recs = read_metrics(run)
    assert recs[0]["step"] == 0 and "eval" in recs[0] and recs[-1]["step"] == 4
    assert set(recs[-1]["weights"]) == {"add", "rev"}
    assert abs(sum(recs[-1]["weights"].values()) - 1) < 1e-9
    assert recs[-1]["train"]["per_dataset"].keys() == {"add", "rev"}
    saved = config.load(run / "config.yaml")
    assert saved.max_steps == 4
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "final")
    data = json.loads((run / "data.json").read_text())
    assert data["datasets"]["add"]["examples"] == 200 - 16


def test_model_from_local_directory_like_a_hub_name(make_config, tmp_path):
    """Real users pass hub names; the same from_pretrained path serves a saved directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import TINY_MODEL
    from mixtune.data.bytetok import byte_tokenizer

    tok = byte_tokenizer()
    spec = dict(TINY_MODEL)
    hf_cfg = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), **spec)
    saved = tmp_path / "saved-model"
    AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(saved)
    tok.save_pretrained(saved)
    raw = make_config(max_steps=2)
    raw["model"] = {"name_or_path": str(saved)}
    trainer = Trainer(config.load(data=raw))
    first = next(iter(trainer.params)).detach().clone()
    trainer.run()
    assert not torch.equal(first, next(iter(trainer.params)))


def test_tensorboard_tracker_receives_metrics(make_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(config.load(data=make_config(max_steps=4, report_to=["tensorboard"]))).run()
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "eval/add/loss" in tags and "weights/add" in tags


def test_the_loop_calls_every_loss_hook_once_where_it_should(make_config, tmp_path):
    """prepare before and after_step after each real step, diagnostics at log steps (logged),
    state_dict into each checkpoint, load_state_dict and then on_resume when resuming."""

    class Recording(Loss):
        def __init__(self, inner, calls):
            self.inner, self.calls = inner, calls

        def __call__(self, logits, labels, extra=None):
            return self.inner(logits, labels, extra)

        def prepare(self, state, batches):
            self.calls.append(("prepare", state.step))
            return self.inner.prepare(state, batches)

        def after_step(self, state):
            self.calls.append(("after_step", state.step))

        def diagnostics(self, state):
            self.calls.append(("diagnostics", state.step))
            return {"calls": len(self.calls)}

        def state_dict(self):
            return {"saved_at": self.calls[-1][1]}

        def load_state_dict(self, state):
            self.calls.append(("load_state_dict", state["saved_at"]))

        def on_resume(self, state):
            self.calls.append(("on_resume", state.step))

    raw = make_config(max_steps=4)
    raw["train"].update(save_every=0, eval_every=0, log_every=2)
    calls = {"first": [], "second": []}
    for part in ("first", "second"):
        trainer = Trainer(config.load(data=raw))
        trainer.loss_fn = Recording(trainer.loss_fn, calls[part])
        trainer.run(stop_after=2 if part == "first" else None)
    step = [("prepare", 0), ("after_step", 1), ("prepare", 1), ("after_step", 2)]
    assert calls["first"] == [*step, ("diagnostics", 2)]
    resumed = [(name, s + 2) for name, s in step]
    assert calls["second"] == [
        ("load_state_dict", 2),
        ("on_resume", 2),
        *resumed,
        ("diagnostics", 4),
    ]
    logged = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert logged == [{"calls": 5}, {"calls": 7}]
