"""Readers beside a writer: ``mixtune eval`` / ``export`` / ``report`` while a train rotates its
checkpoints never crash on a checkpoint deleted under them. They read a whole checkpoint (the
newest one that verifies, chosen again when the one being read is rotated away) or exit 2 with
one line; never exit 1."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mixtune import cli
from mixtune.engine import checkpoint
from mixtune.engine.safewrite import discard


def _run(make_config, tmp_path, **train) -> tuple[Path, Path]:
    raw = make_config(max_steps=4)
    raw["train"].update(save_every=2, keep_checkpoints=2, **train)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, Path(raw["output_dir"])


def test_eval_chooses_again_when_its_checkpoint_is_deleted_between_choice_and_load(
    make_config, tmp_path, monkeypatch, capsys
):
    cfg, run = _run(make_config, tmp_path)
    assert cli.main(["train", str(cfg)]) == 0
    assert [p.name for p in checkpoint.listed(run / "checkpoints")] == [
        "step-000002",
        "step-000004",
    ]
    real, calls = checkpoint.load_trainable, []

    def rotated_under_the_read(path, model, verified=False):
        calls.append(Path(path).name)
        if len(calls) == 1:  # the train rotates the chosen checkpoint away just now
            discard(path)
        return real(path, model, verified)

    monkeypatch.setattr(checkpoint, "load_trainable", rotated_under_the_read)
    capsys.readouterr()
    assert cli.main(["eval", str(run)]) == 0
    assert calls == ["step-000004", "step-000002"]
    assert f"evaluated: {run / 'checkpoints' / 'step-000002'}" in capsys.readouterr().out

    # Every one rotated away while being read: one line, exit 2 (not a traceback).
    calls.clear()

    def always_gone(path, model, verified=False):
        calls.append(Path(path).name)
        discard(path)
        return real(path, model, verified)

    monkeypatch.setattr(checkpoint, "load_trainable", always_gone)
    assert cli.main(["export", str(run), str(tmp_path / "out"), "--step", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the weights of step 2 are not kept" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_damaged_in_place_is_still_bad_input_not_retried(
    make_config, tmp_path, capsys
):
    cfg, run = _run(make_config, tmp_path)
    assert cli.main(["train", str(cfg)]) == 0
    weights = run / "checkpoints" / "step-000004" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--step", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainable.safetensors has" in err[0], err


def test_readers_beside_a_train_rotating_every_step_never_crash(make_config, tmp_path, capsys):
    """A real training process saving every step and keeping one checkpoint; meanwhile eval,
    export and report in a loop (about 30 s): each exits 0, or 2 with one line."""
    raw = make_config(max_steps=400)
    raw["train"].update(save_every=1, keep_checkpoints=1, eval_every=0, log_every=1)
    raw["evals"] = raw["evals"][:1]
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    run = Path(raw["output_dir"])
    train = subprocess.Popen(
        [sys.executable, "-m", "mixtune.cli", "train", str(cfg)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    outcomes: list[tuple[str, int, list[str]]] = []
    try:
        t0 = time.monotonic()
        while not checkpoint.listed(run / "checkpoints"):
            assert train.poll() is None and time.monotonic() - t0 < 300, train.communicate()
            time.sleep(0.1)
        t0, i = time.monotonic(), 0
        while time.monotonic() - t0 < 30 and train.poll() is None:
            i += 1
            argv = [
                ["eval", str(run), "--json"],
                ["export", str(run), str(tmp_path / f"out{i}")],
                ["report", str(run)],
            ][i % 3]
            capsys.readouterr()
            code = cli.main(argv)
            err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mixtune")]
            outcomes.append((argv[0], code, err))
    finally:
        train.terminate()
        train.communicate(timeout=120)
    assert len(outcomes) >= 6, outcomes
    crashed = [o for o in outcomes if o[1] not in (0, 2) or (o[1] == 2 and len(o[2]) != 1)]
    assert not crashed, crashed
    assert sum(code == 0 for _, code, _ in outcomes) >= len(outcomes) // 2, outcomes
    for n, (command, code, _) in enumerate(outcomes, 1):  # an export is whole or absent
        out = tmp_path / f"out{n}"
        if command == "export":
            assert (out / "README.md").is_file() == (code == 0) == out.exists(), (n, code)
            if code == 0:
                assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    print(
        {c: [code for cmd, code, _ in outcomes if cmd == c] for c in ("eval", "export", "report")}
    )
