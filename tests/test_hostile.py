"""Hostile situations a user or a machine produces, through the CLI (docs/robustness.md, "hostile
situations tested"): bad input exits 2 with one line and leaves the run directory byte for byte
as it was; an interruption leaves nothing half-written and the same command resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import addition_records, reverse_records, tiny_config, write_jsonl
from helpers import tree_digest
from mixtune import cli, config
from mixtune.engine import build, lock
from mixtune.engine.loop import Trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """``done``: a finished 4-step run (checkpoints at 2 and 4, a target and a constraint, so
    final/ and selection.json exist); ``half``: the same run stopped after step 2."""
    root = tmp_path_factory.mktemp("hostile")
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "add.jsonl", addition_records(200))
    write_jsonl(data / "rev.jsonl", reverse_records(120))
    raw = tiny_config(root, data, max_steps=4)
    raw["train"].update(save_every=2, eval_every=2, keep_checkpoints=10)
    raw["evals"][0]["role"], raw["evals"][1]["role"] = "target", "constraint"
    raw["output_dir"] = str(root / "done")
    (root / "base.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["train", str(root / "base.yaml")]) == 0
    Trainer(config.load(root / "base.yaml", [f"output_dir={root / 'half'}"])).run(stop_after=2)
    return root


def _copy(runs: Path, which: str, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of run ``which`` in ``tmp_path/run`` and the config that trains it."""
    run = tmp_path / "run"
    shutil.copytree(runs / which, run, symlinks=True)
    raw = yaml.safe_load((runs / "base.yaml").read_text())
    raw["output_dir"] = str(run)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    return run, tmp_path / "run.yaml"


def _refused(argv: list, capsys, watch: Path | None = None, code: int = 2) -> str:
    """Run the CLI; it must exit ``code`` with exactly one ``mixtune:`` line (returned), and
    leave ``watch`` byte-identical."""
    before = None if watch is None else tree_digest(watch)
    capsys.readouterr()
    assert cli.main([str(a) for a in argv]) == code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mixtune")]
    assert len(err) == 1, err
    if watch is not None:
        assert tree_digest(watch) == before
    return err[0]


WRONG_KIND = {
    "metrics.jsonl is a directory": ("metrics.jsonl", "dir", "should be a file"),
    "logs/ is a file": ("logs", "file", "should be a directory"),
    "checkpoints/ is a file": ("checkpoints", "file", "should be a directory"),
    "run.json is a directory": ("run.json", "dir", "should be a file"),
    "train.lock is a directory": ("train.lock", "dir", "is a directory, not mixtune's lock file"),
}


@pytest.mark.parametrize("case", list(WRONG_KIND))
def test_a_run_dir_entry_of_the_wrong_kind_is_bad_input(runs, tmp_path, capsys, case):
    name, kind, said = WRONG_KIND[case]
    run, cfg = _copy(runs, "half", tmp_path)
    p = run / name
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()
    p.mkdir() if kind == "dir" else p.write_text("x")
    assert said in _refused(["train", cfg], capsys, watch=run)


def test_a_hand_edited_config_yaml_is_bad_input(runs, tmp_path, capsys):
    run, cfg = _copy(runs, "half", tmp_path)
    (run / "config.yaml").write_text("{{{: not yaml")
    assert "config.yaml is not valid YAML" in _refused(["train", cfg], capsys, watch=run)
    # Edited into another model: its weights do not fit; eval says so in one line.
    run, _ = _copy(runs, "done", tmp_path / "b")
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["model"]["config"].update(hidden_size=64, intermediate_size=128)
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    assert "was config.yaml edited?" in _refused(["eval", run], capsys)


def test_damaged_records_of_the_answer_are_bad_input(runs, tmp_path, capsys):
    run, _ = _copy(runs, "done", tmp_path)
    (run / "final" / "selection.json").write_text("{")
    assert "is not a selection record" in _refused(["eval", run], capsys)
    assert "is not a selection record" in _refused(["export", run, tmp_path / "o"], capsys)
    assert "is not JSON" in _refused(["report", run], capsys, watch=run)
    (run / "final" / "selection.json").unlink()
    (run / "summary.json").write_text("{")
    assert "summary.json is not JSON" in _refused(["report", run], capsys, watch=run)


def test_checkpoints_that_all_fail_verification_are_not_started_over(runs, tmp_path, capsys):
    """The only checkpoint is damaged: resume=auto used to find none and train from step 0,
    overwriting metrics.jsonl and config.yaml. Now: exit 2, nothing touched."""
    run, cfg = _copy(runs, "half", tmp_path)
    weights = run / "checkpoints" / "step-000002" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    assert "holds checkpoints but none verifies" in _refused(["train", cfg], capsys, watch=run)


def test_export_refuses_a_file_the_run_itself_and_a_non_empty_dir(runs, tmp_path, capsys):
    run, _ = _copy(runs, "done", tmp_path)
    (tmp_path / "a_file").write_text("x")
    assert "is a file" in _refused(["export", run, tmp_path / "a_file"], capsys, watch=run)
    for out in (run, run / "final", run / "checkpoints"):
        assert "is not an empty directory" in _refused(["export", run, out], capsys, watch=run)


def test_a_locked_run_is_locked_under_any_of_its_names(runs, tmp_path, capsys):
    run, cfg = _copy(runs, "half", tmp_path)
    alias = tmp_path / "alias"
    alias.symlink_to(run)
    held = lock.acquire(run)
    try:
        said = _refused(["train", cfg, f"output_dir={alias}"], capsys, watch=run)
    finally:
        held.release()
    assert "is in use by mixtune train pid" in said


def test_ctrl_c_while_writing_final_leaves_no_final_and_the_same_command_finishes_exactly(
    runs, tmp_path, capsys, monkeypatch
):
    run, cfg = _copy(runs, "half", tmp_path)
    real = build.save_final

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)  # written whole into the temporary sibling, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "save_final", interrupted)
    said = _refused(["train", cfg], capsys, code=130)
    assert said == (
        "mixtune: interrupted; the last complete checkpoint is step-000004: run the same "
        "command to resume"
    )
    assert not (run / "final").exists() and not list(run.glob(".tmp-*"))
    monkeypatch.undo()
    assert cli.main(["train", str(cfg)]) == 0
    a, b = (
        load_file(str(run / "final/model.safetensors")),
        load_file(str(runs / "done/final/model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sel = json.loads((run / "final" / "selection.json").read_text())
    assert sel["step"] == json.loads((runs / "done/final/selection.json").read_text())["step"]


def test_eval_json_is_written_whole_or_not_at_all(runs, tmp_path, capsys):
    run, _ = _copy(runs, "done", tmp_path)
    (run / "eval.json").mkdir()
    capsys.readouterr()
    assert cli.main(["eval", str(run)]) == 0
    assert "eval.json not written" in capsys.readouterr().err
    (run / "eval.json").rmdir()
    assert cli.main(["eval", str(run)]) == 0
    assert json.loads((run / "eval.json").read_text())["eval"]
    assert not [p for p in run.iterdir() if ".tmp" in p.name]
