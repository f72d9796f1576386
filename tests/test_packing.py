"""Padding-free packing (train.packing): one row per micro-batch, the padded step's numbers;
on by default (auto) where it is exact."""

import numpy as np
import pytest
import torch

from helpers import numeric_leaves, tiny_llama
from mixtune import config
from mixtune.data.collate import collate, pack
from mixtune.data.tokenize import IGNORE
from mixtune.engine.loop import Trainer
from mixtune.engine.rundir import read_metrics
from mixtune.errors import ConfigError
from mixtune.losses import logits as lg
from mixtune.losses.core import reduce, sequence_mean
from mixtune.registry import LOSSES


def _examples(seed=0, lengths=(7, 3, 11)):
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for n in lengths:
        x = rng.integers(1, 90, n)
        y = x.copy()
        y[: n // 2] = IGNORE  # a prompt
        ids.append(x)
        labels.append(y)
    return ids, labels


def test_pack_restarts_positions_and_never_targets_an_example_start():
    ids, labels = _examples()  # lengths 7, 3, 11
    b = pack(ids, labels, np.array([1, 0, 1]))  # one row, longest first
    assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (1, 21)
    assert b["position_ids"][0].tolist() == [*range(11), *range(7), *range(3)]
    assert b["segment"][0].tolist() == [2] * 11 + [0] * 7 + [1] * 3
    assert b["labels"][0, [0, 11, 18]].tolist() == [IGNORE] * 3
    assert b["domain"].tolist() == [1, 0, 1]
    assert "attention_mask" not in b
    # Same supervised targets as the padded rows (a row's token 0 is never a target there).
    padded = collate(ids, labels, 0)
    assert int((b["labels"][:, 1:] != IGNORE).sum()) == int(
        (padded["labels"][:, 1:] != IGNORE).sum()
    )


def test_pack_fills_rows_up_to_the_capacity_first_fit_decreasing():
    ids, labels = _examples()  # lengths 7, 3, 11
    b = pack(ids, labels, capacity=12, pad_id=99)
    assert b["input_ids"].shape == (2, 11)  # [11] and [7, 3] + 1 padding token
    assert b["segment"].tolist() == [[2] * 11, [0] * 7 + [1] * 3 + [-1]]
    assert b["position_ids"][1].tolist() == [*range(7), *range(3), 0]
    assert b["input_ids"][1, -1] == 99 and b["labels"][1, -1] == IGNORE
    assert b["labels"][1, [0, 7]].tolist() == [IGNORE] * 2
    # A capacity below the longest example is raised to it (11: rows [11] and [7, 3]).
    assert pack(ids, labels, capacity=1)["segment"].tolist() == [[2] * 11, [0] * 7 + [1] * 3 + [-1]]


@pytest.mark.parametrize("loss_name", ["sft", "dft"])
@pytest.mark.parametrize("chunked", [False, True])
def test_packed_and_padded_give_the_same_per_example_losses_and_gradients(loss_name, chunked):
    model = tiny_llama(tie=False)
    lg.configure(model, "chunked" if chunked else "full", 4)
    cls = LOSSES[loss_name]
    loss = cls(cls.Config() if cls.Config else None)
    ids, labels = _examples(1)
    n_tokens = 13.0
    out = {}
    batches = {
        "padded": collate(ids, labels, 0),
        "packed": pack(ids, labels),
        "packed rows": pack(ids, labels, capacity=12),
    }
    for name, batch in batches.items():
        model.zero_grad()
        terms = lg.loss_terms(loss, model, batch)
        reduce(terms.per_token, terms.mask, terms.token_weights, None, n_tokens).backward()
        if name == "padded":
            per_example = sequence_mean(terms.per_token.detach(), terms.mask)
        else:  # per segment of the packed rows
            seg = batch["segment"][:, 1:]
            nll, m = terms.per_token.detach(), terms.mask
            per_example = torch.stack([nll[(seg == i) & m].mean() for i in range(len(ids))])
        out[name] = (per_example, [p.grad.clone() for p in model.parameters()])
    for packed in ("packed", "packed rows"):
        torch.testing.assert_close(out[packed][0], out["padded"][0], atol=1e-5, rtol=1e-5)
        for a, b in zip(out[packed][1], out["padded"][1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_model_that_ignores_positions_is_refused():
    model = tiny_llama(tie=False)
    assert lg.packing_problem(model) is None

    def drop_positions(module, args, kwargs):
        kwargs.pop("position_ids", None)
        return args, kwargs

    model.register_forward_pre_hook(drop_positions, with_kwargs=True)
    assert "lets packed examples see each other" in lg.packing_problem(model)


def _run(raw, tmp_path, name, *overrides, stop_after=None):
    cfg = config.load(data=raw, overrides=[f"output_dir={tmp_path}/{name}", *overrides])
    Trainer(cfg).run(stop_after=stop_after)
    return read_metrics(tmp_path / name)


def test_a_packed_run_tracks_the_padded_run_and_resumes_exactly(make_config, tmp_path):
    """Per-dataset training losses, evaluations and mixture weights, with gradient
    accumulation (micro-batches of 2); a packed run interrupted and resumed is bit-identical
    to the uninterrupted one."""
    raw = make_config(max_steps=6)
    raw["train"]["micro_batch_size"] = 2
    raw["train"]["save_every"] = 3
    padded = _run(raw, tmp_path, "padded", "train.packing=false")
    packed = _run(raw, tmp_path, "packed", "train.packing=true")
    assert _tracks(padded, packed, ("train", "eval")) > 10
    _run(raw, tmp_path, "split", "train.packing=true", stop_after=3)
    split = _run(raw, tmp_path, "split", "train.packing=true")
    assert len(split) == len(packed)
    assert [_strip_time(r) for r in split] == [_strip_time(r) for r in packed]


def _tracks(a: list[dict], b: list[dict], keys: tuple[str, ...]) -> int:
    """Run ``b``'s metrics equal run ``a``'s at every step, in ``keys``, up to float rounding;
    how many numbers were compared."""
    assert [r.get("step") for r in a] == [r.get("step") for r in b]
    n = 0
    for ra, rb in zip(a, b):
        for key in keys:
            if key in ra:
                got = numeric_leaves(rb[key])
                for k, v in numeric_leaves(ra[key]).items():
                    assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (key, k)
                    n += 1
    return n


def _strip_time(record):
    return {k: v for k, v in record.items() if k != "time"}


def _rows_only(monkeypatch):
    """CADFT made to declare ``padded_rows`` (no built-in method needs it any more): what a
    method weighting whole rows would declare."""
    from mixtune.losses.cadft import CADFT

    need = {"padded_rows": "CADFT weights each example by its row (test)"}
    monkeypatch.setattr(CADFT, "requires", staticmethod(lambda o: need))


def test_packing_with_a_loss_that_weights_rows_is_a_config_error(make_config, monkeypatch):
    _rows_only(monkeypatch)
    raw = make_config(loss={"name": "cadft", "rewrite": {"enabled": False}})
    with pytest.raises(ConfigError, match="padded_rows|train.packing"):
        config.load(data=raw, overrides=["train.packing=true"])


def test_packed_evaluation_scores_every_example_as_padded_rows_do(make_config, tmp_path):
    """Evaluation of a packed run (every domain's batches in packed rows, one row or several)
    gives each example's summed NLL and supervised tokens of the padded rows, and the same
    accuracy; a packed run's evaluations go through it (Evaluator.pack_rows)."""
    from mixtune.eval.domains import evaluate_examples

    raw = make_config(max_steps=2)
    cfg = config.load(data=raw, overrides=[f"output_dir={tmp_path}/r", "train.packing=true"])
    t = Trainer(cfg)
    assert t.evaluator.pack_rows == cfg.train.max_length
    args = (t.model, t.acc, t.all_domains, t.tokenizer)
    padded = evaluate_examples(*args)
    lengths = [len(x) for d in t.all_domains for x in d.data.input_ids]
    for rows in (cfg.train.max_length, max(lengths)):  # few rows; one example's length
        packed = evaluate_examples(*args, pack_rows=rows)
        for name, sc in padded.items():
            assert (packed[name].tokens == sc.tokens).all()
            np.testing.assert_allclose(packed[name].nll, sc.nll, rtol=1e-5, atol=1e-4)
            if sc.correct is not None:
                assert (packed[name].correct == sc.correct).all()
    assert any(sc.tokens.sum() > 0 for sc in padded.values())


def test_auto_packs_by_default_and_records_the_resolved_value(make_config, tmp_path):
    raw = make_config(max_steps=1, output_dir=str(tmp_path / "auto"))
    trainer = Trainer(config.load(data=raw))
    assert trainer.cfg.train.packing is True
    assert trainer.fingerprint["train.packing"] is True  # what run.json records
    trainer.run()
    saved = config.load(tmp_path / "auto" / "config.yaml")
    assert saved.train.packing is True


def test_auto_falls_back_to_padded_rows_for_a_loss_that_weights_rows(
    make_config, tmp_path, caplog, monkeypatch
):
    _rows_only(monkeypatch)
    raw = make_config(max_steps=1, loss={"name": "cadft", "rewrite": {"enabled": False}})
    with caplog.at_level("INFO", logger="mixtune.engine.loop"):
        trainer = Trainer(config.load(data=raw))
    assert trainer.cfg.train.packing is False
    lines = [r.getMessage() for r in caplog.records if "train.packing=auto" in r.getMessage()]
    assert len(lines) == 1 and "CADFT weights each example" in lines[0]


def test_auto_falls_back_when_attention_mixes_packed_examples(make_config, monkeypatch, caplog):
    monkeypatch.setattr(lg, "packing_problem", lambda model: "attention (x) mixes examples")
    raw = make_config(max_steps=1)
    with caplog.at_level("INFO", logger="mixtune.engine.loop"):
        trainer = Trainer(config.load(data=raw))
    assert trainer.cfg.train.packing is False
    trainer.close()  # releases the run directory's lock for the next start
    assert any("attention (x) mixes examples" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="train.packing: attention .x. mixes examples; set"):
        Trainer(config.load(data=raw, overrides=["train.packing=true"]))


def test_a_run_recorded_padded_resumes_under_auto_as_an_amendment(make_config, tmp_path):
    """Runs recorded before packing was the default (train.packing: false) resume under
    ``auto``: packed and padded steps are the same up to float rounding, like another
    micro_batch_size, so the change is recorded, not refused."""
    raw = make_config(max_steps=4)
    raw["train"]["save_every"] = 2
    _run(raw, tmp_path, "old", "train.packing=false", stop_after=2)
    _run(raw, tmp_path, "old")  # auto -> true
    amended = (tmp_path / "old" / "amendments.jsonl").read_text()
    assert "train.packing" in amended


@pytest.mark.parametrize(
    "options", [{}, {"reduction": "sample_mean", "rewrite": {"enabled": False}}]
)
def test_cadft_packed_equals_padded_with_accumulation(make_config, tmp_path, options):
    """CADFT on packed rows (train.packing: auto packs it): its per-example compatibilities,
    z-scores and weights, per-dataset losses, diagnostics and the trained parameters equal the
    padded run's within float rounding, with micro-batches of 2 (gradient accumulation) and
    rewriting on (its bookkeeping per example)."""
    raw = make_config(max_steps=4, loss={"name": "cadft", **options})
    raw["train"].update(micro_batch_size=2, log_every=1, eval_every=2)
    out = {}
    for packing in ("false", "auto"):
        cfg = config.load(
            data=raw, overrides=[f"output_dir={tmp_path}/{packing}", f"train.packing={packing}"]
        )
        t = Trainer(cfg)
        assert t.cfg.train.packing is (packing == "auto")
        t.run()
        out[packing] = (read_metrics(tmp_path / packing), [p.detach().clone() for p in t.params])
    (a, pa), (b, pb) = out["false"], out["auto"]
    assert _tracks(a, b, ("train", "eval", "loss")) > 20
    for x, y in zip(pa, pb):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-4)


def test_the_attention_implementation_is_chosen_and_a_resume_may_change_it(make_config, tmp_path):
    """model.attn_implementation reaches the model (eager here; transformers' default sdpa
    otherwise), packing stays on under it (eager isolates packed examples too), the run tracks
    the default run up to float rounding, and a resume under another kernel is an amendment."""
    raw = make_config(max_steps=4)
    raw["train"]["save_every"] = 2
    trainer = Trainer(
        config.load(
            data=raw,
            overrides=[f"output_dir={tmp_path}/probe", "model.attn_implementation=eager"],
        )
    )
    assert lg.unwrap(trainer.model).config._attn_implementation == "eager"
    assert trainer.cfg.train.packing is True
    trainer.close()
    default = _run(raw, tmp_path, "default")
    eager = _run(raw, tmp_path, "eager", "model.attn_implementation=eager")
    assert _tracks(default, eager, ("train", "eval")) > 10
    _run(raw, tmp_path, "switch", "model.attn_implementation=eager", stop_after=2)
    _run(raw, tmp_path, "switch", "model.attn_implementation=sdpa")
    assert "model.attn_implementation" in (tmp_path / "switch" / "amendments.jsonl").read_text()
