"""Checkpoints verify themselves and hold no code.

Every checkpoint carries ``manifest.json`` (each file's size and SHA-256, written last). With
``resume=auto`` a run whose latest checkpoint is damaged in any file (truncated, missing, garbage,
one flipped bit) resumes from the one before, reporting the damaged one in one log line, and
ends with the parameters of an uninterrupted run. An explicit ``resume=<dir>`` that fails is exit
2 naming the file, touching nothing; so is a state file whose unpickling would run code (it is
never executed). Checkpoints written before manifests existed still resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import addition_records, reverse_records, tiny_config, write_jsonl
from mixtune import cli, config
from mixtune.engine import checkpoint, integrity
from mixtune.engine.loop import Trainer
from mixtune.errors import ConfigError

STEPS = 6
LATEST = "checkpoints/step-000004"  # of the stopped run; step-000002 is intact


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """An uninterrupted run (``ref``), and the same run stopped after step 4 (``pristine``:
    checkpoints 2 and 4), which each test copies back to ``run`` before damaging it."""
    root = tmp_path_factory.mktemp("integrity")
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "add.jsonl", addition_records(120))
    write_jsonl(data / "rev.jsonl", reverse_records(80))
    for name in ("ref", "run"):
        raw = tiny_config(root, data, output_dir=str(root / name), max_steps=STEPS)
        # EXP3 at every step: its weights depend on the whole loss history.
        raw["mixer"] = {"name": "exp3", "update_every": 1, "warmup_steps": 2}
        raw["train"].update(save_every=2, keep_checkpoints=10, log_every=1, eval_every=3)
        (root / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["train", str(root / "ref.yaml")]) == 0
    Trainer(config.load(root / "run.yaml")).run(stop_after=4)
    shutil.move(root / "run", root / "pristine")
    return root


def _fresh(root: Path) -> Path:
    shutil.rmtree(root / "run", ignore_errors=True)
    shutil.copytree(root / "pristine", root / "run")
    return root / "run"


def _tree(path: Path) -> dict:
    return {
        str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _params(run: Path) -> dict:
    return load_file(str(run / f"checkpoints/step-{STEPS:06d}/trainable.safetensors"))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(f: Path) -> None:
    raw = bytearray(f.read_bytes())
    raw[len(raw) * 3 // 4] ^= 0x01  # one bit of one weight, well past the header
    f.write_bytes(bytes(raw))


def _garbage(f: Path) -> None:
    f.write_bytes(b'{"not": "this file"}')


# case -> (file, damage, what the log line says about it)
DAMAGE = {
    "weights_truncated": ("trainable.safetensors", _truncate, "trainable.safetensors has"),
    "weights_bit_flip": ("trainable.safetensors", _flip, "trainable.safetensors does not match"),
    "optimizer_missing": ("optimizer.pt", Path.unlink, "optimizer.pt is missing"),
    "scheduler_garbage": ("scheduler.pt", _garbage, "scheduler.pt has"),
    "rank_missing": ("rank0.pt", Path.unlink, "rank0.pt is missing"),
    "mixer_missing": ("mixer.pt", Path.unlink, "mixer.pt is missing"),
    "loss_truncated": ("loss.pt", _truncate, "loss.pt has"),
    "state_truncated": ("state.json", _truncate, "state.json has"),
    "sampler_garbage": ("sampler.json", _garbage, "sampler.json has"),
    "manifest_missing": ("manifest.json", Path.unlink, "manifest.json is missing"),
    "manifest_garbage": ("manifest.json", _garbage, "manifest.json is unreadable"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_resume_auto_skips_a_damaged_checkpoint_and_resumes_exactly(runs, case, caplog):
    run = _fresh(runs)
    name, damage, says = DAMAGE[case]
    damage(run / LATEST / name)
    with caplog.at_level(logging.INFO):
        assert cli.main(["train", str(runs / "run.yaml")]) == 0
    said = [r.getMessage() for r in caplog.records]
    skipped = [m for m in said if "is damaged" in m]
    assert len(skipped) == 1 and str(run / LATEST) in skipped[0] and says in skipped[0], said
    assert any(f"resuming from {run / 'checkpoints/step-000002'} at step 2" in m for m in said)
    got, want = _params(run), _params(runs / "ref")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(STEPS + 1))


def test_a_damaged_checkpoint_is_skipped_not_touched(runs, tmp_path):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(runs / "pristine/checkpoints", ckpts)
    _flip(ckpts / "step-000004/trainable.safetensors")
    before = _tree(ckpts)
    assert checkpoint.complete(ckpts) == [ckpts / "step-000002"]
    assert _tree(ckpts) == before
    with pytest.raises(ConfigError, match="trainable.safetensors does not match its SHA-256"):
        integrity.verify(ckpts / "step-000004")


def test_explicit_resume_of_a_damaged_checkpoint_is_bad_input(runs, capsys):
    run = _fresh(runs)
    ckpt = run / LATEST
    _flip(ckpt / "trainable.safetensors")
    before = _tree(run)
    code = cli.main(["train", str(runs / "run.yaml"), f"resume={ckpt}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"mixtune: error: checkpoint {ckpt}: "), err
    assert "trainable.safetensors does not match its SHA-256" in err[0], err
    assert _tree(run) == before
    # into a new output_dir: not even created
    elsewhere = runs / "elsewhere"
    code = cli.main(["train", str(runs / "run.yaml"), f"resume={ckpt}", f"output_dir={elsewhere}"])
    assert code == 2
    assert not elsewhere.exists()


class _Payload:
    """Unpickling this creates ``path``: what a malicious checkpoint file would do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_state_file_that_would_run_code_is_refused_not_run(runs, tmp_path, capsys):
    live = tmp_path / "live.pt"
    torch.save({"calls": 1, "x": _Payload(tmp_path / "proof")}, live)
    torch.load(live, weights_only=False)
    assert (tmp_path / "proof").exists()  # the payload is live: the old loader ran it

    run = _fresh(runs)
    marker = tmp_path / "marker"
    evil = run / LATEST / "mixer.pt"
    torch.save({"calls": 1, "x": _Payload(marker)}, evil)
    # Whoever can write the file can write the manifest too: verification passes.
    manifest = json.loads((run / LATEST / "manifest.json").read_text())
    digest = hashlib.sha256(evil.read_bytes()).hexdigest()
    manifest["files"]["mixer.pt"] = {"size": evil.stat().st_size, "sha256": digest}
    (run / LATEST / "manifest.json").write_text(json.dumps(manifest))
    before = _tree(run)
    code = cli.main(["train", str(runs / "run.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and f"checkpoint {run / LATEST}: mixer.pt was refused" in err[0], err
    assert not marker.exists()
    assert _tree(run) == before


def test_checkpoints_without_a_manifest_still_resume(runs, caplog):
    """As written before manifests existed: no manifest.json, and state.json not expecting one."""
    run = _fresh(runs)
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "manifest.json").unlink()
        state = json.loads((ckpt / "state.json").read_text())
        del state["manifest"]
        (ckpt / "state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.INFO):
        assert cli.main(["train", str(runs / "run.yaml")]) == 0
    assert not [r for r in caplog.records if "is damaged" in r.getMessage()]
    got, want = _params(run), _params(runs / "ref")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (run / f"checkpoints/step-{STEPS:06d}/manifest.json").is_file()


def test_manifest_lists_every_file_with_its_hash(runs):
    ckpt = runs / "ref" / f"checkpoints/step-{STEPS:06d}"
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert set(files) == {p.name for p in ckpt.iterdir()} - {"manifest.json"}
    for name, entry in files.items():
        assert entry["size"] == os.path.getsize(ckpt / name)
        assert entry["sha256"] == hashlib.sha256((ckpt / name).read_bytes()).hexdigest()


def test_a_proxymix_learner_state_that_would_run_code_is_refused(tmp_path):
    from mixtune.mixers.proxymix.reinforce import LearnConfig, train
    from mixtune.mixers.proxymix.toy import ToyEnv

    marker = tmp_path / "marker"
    torch.save({"episode": 1, "x": _Payload(marker)}, tmp_path / "learner.pt")
    with pytest.raises(ConfigError, match="learner.pt is damaged or holds more than tensors"):
        train(ToyEnv(), LearnConfig(episodes=2), 0, tmp_path, echo=lambda s: None)
    assert not marker.exists()


def test_a_full_disk_is_one_line_and_the_last_checkpoint_stays_the_latest(
    runs, monkeypatch, capsys
):
    """No space left while writing step 6: exit 1 with one line naming the step and the last
    complete checkpoint; no half-written directory; with room again, the same command resumes
    exactly."""
    import errno

    run = _fresh(runs)
    real = integrity._HashingFile.write

    class Full:  # a file on a full disk
        def __init__(self, name):
            self.name = name

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device", self.name)

    def full(self, b):  # the first file of step 6 (written by torch.save) finds the disk full
        if "000006" in self.f.name:
            self.f = Full(self.f.name)
        return real(self, b)

    monkeypatch.setattr(integrity._HashingFile, "write", full)
    capsys.readouterr()
    assert cli.main(["train", str(runs / "run.yaml")]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mixtune")]
    assert len(err) == 1, err
    assert "no space left on device while writing checkpoint step 6" in err[0]
    assert "the last complete checkpoint is step-000004" in err[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
    ]
    monkeypatch.setattr(integrity._HashingFile, "write", real)
    assert cli.main(["train", str(runs / "run.yaml")]) == 0
    a, b = _params(run), _params(runs / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rotating_a_checkpoint_that_is_a_symlink_removes_the_link_and_leaves_nothing(tmp_path):
    """A checkpoint directory symlinked elsewhere: rotation removes the link (its target is the
    user's) and leaves no ``.tmp-del-`` entry behind."""
    from mixtune.engine.checkpoint import _discard

    target = tmp_path / "elsewhere" / "step-000002"
    target.mkdir(parents=True)
    (target / "state.json").write_text("{}")
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "step-000002").symlink_to(target, target_is_directory=True)
    real = ckpts / "step-000001"
    real.mkdir()
    (real / "state.json").write_text("{}")
    _discard(ckpts / "step-000002")
    _discard(real)
    assert list(ckpts.iterdir()) == []
    assert (target / "state.json").is_file()


def test_a_checkpoint_from_a_newer_format_is_named_as_such(runs, capsys):
    """A checkpoint whose manifest says a newer format: an explicit resume exits 2 saying so
    (upgrade mixtune), the run directory untouched."""
    import json

    run = _fresh(runs)
    ckpt = run / LATEST
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["format"] = 99
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    before = _tree(run)
    code = cli.main(["train", str(runs / "run.yaml"), f"resume={ckpt}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and "written by a newer mixtune (checkpoint format 99" in err[0], err
    assert "upgrade mixtune" in err[0]
    assert _tree(run) == before
