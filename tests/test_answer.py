"""The run's answer (engine/answer.py): final/ holds the best feasible evaluated step, or the base
model, bit for bit; selection.json agrees with summary.json; the verdict is logged; rotation
never deletes the weights the answer needs; eval --step; branching from a checkpoint.

The constraint is made to break from step 6 on by adding 10 to its evaluated loss (the real
evaluation otherwise), so the best feasible step is an early one and not the last.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config
from mixtune import cli, config
from mixtune.engine import loop
from mixtune.engine.evaluation import Evaluator

BREAK_FROM = 6


def broken_from(step_from: int, domain: str = "rev"):
    """A stand-in for Evaluator.scheduled: the real evaluation, with ``domain``'s loss raised
    by 10 from ``step_from`` on (the constraint breaks)."""
    real = Evaluator.scheduled

    def scheduled(self, step):
        result = real(self, step)
        if step >= step_from:
            result[domain]["loss"] += 10.0
        return result

    return scheduled


def constrained(tmp_path, data_dir, name: str, **train) -> dict:
    cfg = tiny_config(tmp_path, data_dir, output_dir=str(tmp_path / name))
    cfg["evals"][0]["role"] = "target"
    cfg["evals"][1]["role"] = "constraint"
    cfg["train"].update(eval_every=2, save_every=2, **train)
    return cfg


def run(cfg: dict, break_from: int = BREAK_FROM) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Evaluator, "scheduled", broken_from(break_from))
        return loop.train(config.from_dict(cfg))


def model_tensors(path) -> dict:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two constrained runs of 8 steps: ``kept`` keeps every checkpoint, ``rotated`` only the
    latest (keep_checkpoints=1)."""
    from conftest import addition_records, reverse_records, write_jsonl

    tmp = tmp_path_factory.mktemp("answer")
    data = tmp / "data"
    data.mkdir()
    write_jsonl(data / "add.jsonl", addition_records(200))
    write_jsonl(data / "rev.jsonl", reverse_records(120))
    out = {}
    for name, keep in (("kept", 10), ("rotated", 1)):
        cfg = constrained(tmp, data, name, keep_checkpoints=keep)
        out[name] = (tmp / name, run(cfg), cfg)
    out["data"] = data
    return out


def test_final_is_the_best_feasible_step_bit_for_bit(runs):
    path, summary, _ = runs["kept"]
    best = summary["best_feasible"]
    assert best["feasible"] and best["step"] in (2, 4)  # steps 6 and 8 break the constraint
    ckpt = path / "checkpoints" / f"step-{best['step']:06d}"
    final = model_tensors(path / "final")
    for name, t in load_file(str(ckpt / "trainable.safetensors")).items():
        assert torch.equal(final[name], t), name
    # the last step's model is kept beside it, and is the last checkpoint's
    last = model_tensors(path / "final-last")
    for name, t in load_file(str(path / "checkpoints/step-000008/trainable.safetensors")).items():
        assert torch.equal(last[name], t), name
    assert any(not torch.equal(final[n], last[n]) for n in final)


def test_selection_json_matches_summary(runs):
    path, summary, _ = runs["kept"]
    sel = json.loads((path / "final" / "selection.json").read_text())
    assert sel == summary["selection"]
    assert sel["rule"] == "best_feasible" and sel["source"] == "checkpoint"
    assert sel["step"] == summary["best_feasible"]["step"] == sel["best_feasible_step"]
    assert sel["last_step"] == 8 and sel["path"] == str(path / "final")
    assert sel["last_path"] == str(path / "final-last")
    rev, add = sel["domains"]["rev"], sel["domains"]["add"]
    assert rev["role"] == "constraint" and rev["kept"] is True
    assert rev["reference"] == summary["best_feasible"]["references"]["rev"]
    assert rev["slack"] == pytest.approx(rev["reference"] - rev["value"])
    assert add == {**add, "role": "target", "reference": None, "slack": None, "kept": None}
    evals = {
        r["step"]: r["eval"]
        for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
        if "eval" in r
    }
    assert add["value"] == evals[sel["step"]]["add"]["loss"]


def test_final_loads_and_generates(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = runs["kept"][0] / "final"
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok("12+3=")["input_ids"]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 4


def test_rotation_never_deletes_the_answers_weights(runs):
    path, summary, _ = runs["rotated"]
    step = summary["best_feasible"]["step"]
    assert [p.name for p in (path / "checkpoints").glob("step-*")] == ["step-000008"]
    copies = sorted(p.name for p in (path / "checkpoints" / "weights").iterdir())
    assert copies == [f"step-{step:06d}"]  # the superseded copies are gone
    # the same weights as the run that kept every checkpoint (the runs are identical)
    kept = load_file(str(runs["kept"][0] / f"checkpoints/step-{step:06d}/trainable.safetensors"))
    final = model_tensors(path / "final")
    assert all(torch.equal(final[n], t) for n, t in kept.items())
    assert summary["best_feasible"]["checkpoint"] == str(path / "checkpoints/weights" / copies[0])


def test_the_verdict_is_logged(tmp_path, data_dir, caplog):
    cfg = constrained(tmp_path, data_dir, "said", keep_checkpoints=1)
    with caplog.at_level(logging.INFO, logger="mixtune"):
        summary = run(cfg)
    said = "\n".join(r.getMessage() for r in caplog.records)
    step = summary["best_feasible"]["step"]
    assert f"answer (best_feasible): step {step} of 8; 1/1 constraints kept" in said
    assert "the last step (8) broke rev (-" in said
    assert "constraint rev" in said and "vs reference" in said and ": kept (slack +" in said
    assert f"model to use: {tmp_path / 'said' / 'final'}" in said
    assert f"the last step's model: {tmp_path / 'said' / 'final-last'}" in said


def test_nothing_feasible_keeps_the_base_model(tmp_path, data_dir, caplog):
    cfg = constrained(tmp_path, data_dir, "base", keep_checkpoints=1)
    with caplog.at_level(logging.INFO, logger="mixtune"):
        summary = run(cfg, break_from=1)
    path = tmp_path / "base"
    assert summary["best_feasible"]["keep_base_model"]
    sel = json.loads((path / "final" / "selection.json").read_text())
    assert (sel["step"], sel["source"], sel["best_feasible_step"]) == (None, "base", None)
    assert sel["domains"]["rev"]["kept"] is True  # the base model is at its own reference
    # final/ is the model as it was at step 0: the weights a fresh build with the seed gives
    from mixtune.engine import build

    c = config.from_dict(cfg)
    base = build.load_model(c.model, build.load_tokenizer(c.model), c.seed, torch.float32)
    final = model_tensors(path / "final")
    assert all(torch.equal(final[n], p.detach()) for n, p in base.named_parameters())
    said = [r.getMessage() for r in caplog.records]
    assert any("answer (best_feasible): keep the BASE model: no evaluated step" in m for m in said)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("final/ holds the BASE model" in w for w in warned)


def test_final_model_last(tmp_path, data_dir):
    cfg = constrained(tmp_path, data_dir, "last", final_model="last")
    summary = run(cfg)
    path = tmp_path / "last"
    sel = summary["selection"]
    assert (sel["rule"], sel["step"], sel["source"]) == ("last", 8, "last")
    assert sel["best_feasible_step"] == summary["best_feasible"]["step"] != 8
    assert sel["domains"]["rev"]["kept"] is False
    assert not (path / "final-last").exists()
    final = model_tensors(path / "final")
    ckpt = load_file(str(path / "checkpoints/step-000008/trainable.safetensors"))
    assert all(torch.equal(final[n], t) for n, t in ckpt.items())


def test_eval_a_chosen_step(runs, capsys):
    path, summary, _ = runs["kept"]
    evals = {
        r["step"]: r["eval"]
        for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
        if "eval" in r
    }
    for args, step in (
        ([str(path), "--step", "6"], 6),
        ([str(path / "checkpoints" / "step-000002")], 2),
        ([str(path)], summary["best_feasible"]["step"]),  # the run's answer by default
        ([str(path / "checkpoints/weights" / f"step-{summary['selection']['step']:06d}")], None),
    ):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Evaluator, "scheduled", broken_from(BREAK_FROM))
            assert cli.main(["eval", *args, "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        step = summary["selection"]["step"] if step is None else step
        assert got["source"].startswith(f"step {step} (")
        for name in ("add", "rev"):  # (the evaluation in the run had +10 on rev from step 6)
            logged = evals[step][name]["loss"] - (10.0 if name == "rev" and step >= 6 else 0)
            assert got["eval"][name]["loss"] == pytest.approx(logged, abs=1e-6)
    assert cli.main(["eval", str(runs["rotated"][0]), "--step", "6"]) == 2
    assert "the weights of step 6 are not kept; steps kept: [" in capsys.readouterr().err


def test_branching_from_a_checkpoint_into_a_new_run(runs, tmp_path, capsys):
    """A checkpoint of another run continued into a new output_dir: metrics start where the
    source stopped, the continuation is the source's own, and the answer can still be an
    earlier step of the source (its weights copy comes along)."""
    path, summary, _ = runs["kept"]
    new = tmp_path / "branch"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Evaluator, "scheduled", broken_from(BREAK_FROM))
        code = cli.main(
            [
                "train",
                str(path / "config.yaml"),
                f"resume={path / 'checkpoints' / 'step-000004'}",
                f"output_dir={new}",
            ]
        )
    assert code == 0
    step = summary["best_feasible"]["step"]
    said = capsys.readouterr().out  # the table is the last step's, and says so
    assert f"(the last step's evaluation; final/ holds step {step}: mixtune eval {new})" in said

    def records(p):
        out = [json.loads(ln) for ln in (p / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "time"} for r in out]

    assert records(new) == records(path)  # steps 0-4 copied, 6-8 trained the same
    mine = json.loads((new / "summary.json").read_text())
    assert mine["best_feasible"]["step"] == summary["best_feasible"]["step"]
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            model_tensors(new / "final").values(), model_tensors(path / "final").values()
        )
    )
    assert json.loads((new / "run.json").read_text())["since_step"] == 4


def test_branching_at_the_source_s_last_step(runs, tmp_path):
    """The issue's case: resume=<the last checkpoint> output_dir=new, nothing left to train."""
    path, summary, _ = runs["rotated"]
    new = tmp_path / "at-end"
    code = cli.main(
        [
            "train",
            str(path / "config.yaml"),
            f"resume={path / 'checkpoints' / 'step-000008'}",
            f"output_dir={new}",
        ]
    )
    assert code == 0
    sel = json.loads((new / "final" / "selection.json").read_text())
    assert sel["step"] == summary["best_feasible"]["step"]
    assert (new / "checkpoints" / "weights" / f"step-{sel['step']:06d}").is_dir()


def test_branching_that_changes_the_trajectory_exits_2(runs, tmp_path, capsys):
    path = runs["kept"][0]
    code = cli.main(
        [
            "train",
            str(path / "config.yaml"),
            f"resume={path / 'checkpoints' / 'step-000004'}",
            f"output_dir={tmp_path / 'other'}",
            "train.lr=0.1",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "train without resume=" in err


def test_config_yaml_round_trip_keeps_final_model(runs):
    saved = yaml.safe_load((runs["kept"][0] / "config.yaml").read_text())
    assert saved["train"]["final_model"] == "best_feasible"


def test_a_damaged_answer_copy_leaves_the_last_model_and_says_so(runs, tmp_path, caplog):
    """Finishing again (the same command on a finished run) with the answer's weights copy
    damaged: final/ falls back to the last step's model, with a warning naming the file."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(runs["rotated"][0], run)
    step = runs["rotated"][1]["best_feasible"]["step"]
    f = run / "checkpoints" / "weights" / f"step-{step:06d}" / "trainable.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="mixtune"):
        assert cli.main(["train", str(run / "config.yaml"), f"output_dir={run}"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"the weights of step {step} are unusable (" in w for w in warned), warned
    sel = json.loads((run / "final" / "selection.json").read_text())
    assert (sel["step"], sel["source"], sel["best_feasible_step"]) == (8, "last", step)
    assert not (run / "final-last").exists()


def test_keep_evaluated_all_makes_every_evaluated_step_exportable(tmp_path, data_dir, capsys):
    """With rotation keeping one checkpoint, every evaluated step still has its weights (and
    no optimizer state): eval --step and export --step work on each."""
    cfg = constrained(tmp_path, data_dir, "all", keep_checkpoints=1, keep_evaluated="all")
    run(cfg)
    path = tmp_path / "all"
    assert [p.name for p in sorted((path / "checkpoints").glob("step-*"))] == ["step-000008"]
    copies = sorted(p.name for p in (path / "checkpoints/weights").glob("step-*"))
    assert copies == [f"step-{s:06d}" for s in (0, 2, 4, 6, 8)]
    assert not list((path / "checkpoints/weights").rglob("optimizer*"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Evaluator, "scheduled", broken_from(BREAK_FROM))
        assert cli.main(["eval", str(path), "--step", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source"].startswith("step 4 (")
    assert cli.main(["export", str(path), "--step", "2", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
