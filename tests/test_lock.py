"""One writer per run directory: ``mixtune train`` holds ``<output_dir>/train.lock`` (flock) from
before its first write to its end; a second writer exits 2 naming the holder and touching nothing;
a lock left by a killed process is taken over; readers never take it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import tree_digest
from mixtune import cli, config
from mixtune.engine import lock
from mixtune.engine.loop import Trainer


def _write(make_config, tmp_path, **top) -> tuple[Path, Path]:
    raw = make_config(**top)
    raw["train"].update(log_every=1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, Path(raw["output_dir"])


def _tree(path: Path) -> dict:
    return {
        str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _train(cfg: Path, env: dict | None = None) -> subprocess.Popen:
    """``mixtune train CFG`` in a fresh interpreter (its pid is the trainer's)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mixtune.cli", "train", str(cfg)],
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _steps(run: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_second_writer_exits_2_naming_the_holder_and_readers_go_on(make_config, tmp_path, capsys):
    cfg, run = _write(make_config, tmp_path, max_steps=2)
    assert cli.main(["train", str(cfg)]) == 0
    assert not (run / lock.LOCK_FILE).exists()  # released (and removed) at the end
    held = lock.acquire(run)  # this process now trains there, as far as anyone can tell
    try:
        before = _tree(run)
        capsys.readouterr()
        assert cli.main(["train", str(cfg)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        holder = f"mixtune train pid {os.getpid()} on {socket.gethostname()} (since "
        assert len(err) == 1 and f"output_dir {run} is in use by {holder}" in err[0], err
        assert "choose another output_dir" in err[0]
        assert _tree(run) == before  # not even config.yaml or metrics.jsonl rewritten
        assert cli.main(["eval", str(run)]) == 0  # a reader
    finally:
        held.release()
    assert not (run / lock.LOCK_FILE).exists()


def test_a_new_run_dir_is_not_created_by_a_refused_start(tmp_path):
    run = tmp_path / "new" / "run"
    first = lock.acquire(run)
    with pytest.raises(lock.RunDirLocked, match=f"pid {os.getpid()}"):
        lock.acquire(run)
    first.release()
    assert not (tmp_path / "new").exists()  # created by the lock, nothing else written: gone


def test_the_lock_is_released_when_training_fails(make_config, tmp_path, monkeypatch):
    cfg, run = _write(make_config, tmp_path, max_steps=2)
    trainer = Trainer(config.load(cfg))

    def fail(stop_after):
        assert (run / lock.LOCK_FILE).is_file()
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer, "_start", fail)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.run()
    assert not (run / lock.LOCK_FILE).exists()
    lock.acquire(run).release()


def test_two_trains_started_together_one_trains_the_other_exits_2(make_config, tmp_path):
    cfg, run = _write(make_config, tmp_path, max_steps=4)
    slow = {"MIXTUNE_TEST_CHECKPOINT_PAUSE": "1.0"}  # a save per step: >= 4 s of training
    cfg_raw = yaml.safe_load(cfg.read_text())
    cfg_raw["train"]["save_every"] = 1
    cfg.write_text(yaml.safe_dump(cfg_raw))
    procs = [_train(cfg, slow), _train(cfg, slow)]
    out = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], out
    winner, loser = (procs, out) if codes[0] == 0 else (procs[::-1], out[::-1])
    err = loser[1][1].strip().splitlines()
    assert err[-1].startswith(f"mixtune: error: output_dir {run} is in use by "), err
    assert f"mixtune train pid {winner[0].pid} on " in err[-1], err
    assert _steps(run) == [0, 1, 2, 3, 4]  # each step once
    assert not (run / lock.LOCK_FILE).exists()


def test_a_lock_left_by_a_killed_train_is_taken_over(make_config, tmp_path, caplog):
    cfg, run = _write(make_config, tmp_path, max_steps=4)
    proc = _train(cfg, {"MIXTUNE_TEST_CHECKPOINT_PAUSE": "30"})  # parked in its first save
    path, t0 = run / lock.LOCK_FILE, time.monotonic()
    while not (path.is_file() and path.read_text()):
        assert proc.poll() is None and time.monotonic() - t0 < 300, proc.communicate()
        time.sleep(0.05)
    assert json.loads(path.read_text())["pid"] == proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert path.is_file()  # left behind, but no longer locked (the kernel dropped it)
    with caplog.at_level(logging.WARNING, logger="mixtune.engine.lock"):
        assert cli.main(["train", str(cfg)]) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "mixtune.engine.lock"]
    assert len(said) == 1 and f"left by mixtune train pid {proc.pid} on " in said[0], said
    assert "taking it over" in said[0]
    assert _steps(run) == [0, 1, 2, 3, 4]
    assert not path.exists()


@pytest.mark.dist
def test_every_rank_of_a_distributed_train_stops_on_a_locked_dir(make_config, tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not available")
    cfg, run = _write(make_config, tmp_path, max_steps=2)
    held = lock.acquire(run)
    try:
        proc = subprocess.run(
            [shutil.which("torchrun"), "--standalone", "--nproc_per_node", "2"]
            + ["-m", "mixtune.cli", "train", str(cfg)],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        held.release()
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert text.count(f"is in use by mixtune train pid {os.getpid()}") == 1, text[-3000:]
    assert text.count("mixtune: error: output_dir") == 2, text[-3000:]  # both ranks, no hang
    assert not run.exists()


def test_a_second_train_while_the_first_trains_exits_2_and_leaves_the_dir_byte_identical(
    make_config, tmp_path
):
    cfg, run = _write(make_config, tmp_path, max_steps=4)
    raw = yaml.safe_load(cfg.read_text())
    raw["train"]["save_every"] = 1
    cfg.write_text(yaml.safe_dump(raw))
    first = _train(cfg, {"MIXTUNE_TEST_CHECKPOINT_PAUSE": "60"})  # parked in its first save
    try:
        t0 = time.monotonic()
        while not any(run.glob("checkpoints/.tmp-step-*/rank0.pt")):
            assert first.poll() is None and time.monotonic() - t0 < 300, first.communicate()
            time.sleep(0.05)
        before = None  # the first save writes its files, then parks: wait until it has
        while before != (before := tree_digest(run)):
            time.sleep(1.0)
        second = _train(cfg)
        out, err = second.communicate(timeout=300)
        assert second.returncode == 2, (out, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"mixtune: error: output_dir {run} is in use by ")
        assert f"mixtune train pid {first.pid} on {socket.gethostname()}" in lines[0]
        assert tree_digest(run) == before
    finally:
        first.kill()
        first.communicate(timeout=60)


def test_the_lock_is_taken_when_a_writer_is_built_before_the_run_dir_is_read(
    make_config, tmp_path, monkeypatch
):
    """Construction, not run(), takes it: a second writer stops before it looks for a resume
    point; a reader (writer=False) takes no lock at all."""
    from mixtune.engine import rundir

    cfg, run = _write(make_config, tmp_path, max_steps=2)
    writer = Trainer(config.load(cfg))
    assert (run / lock.LOCK_FILE).is_file()
    read = []
    monkeypatch.setattr(rundir.RunDir, "resume_point", lambda self, r: read.append(r))
    with pytest.raises(lock.RunDirLocked, match=f"pid {os.getpid()}"):
        Trainer(config.load(cfg))
    assert read == []  # refused before reading the run directory
    reader = Trainer(config.load(cfg), writer=False)  # evaluation only: no lock, no resume
    assert reader.resume_from is None and read == []
    with pytest.raises(ValueError, match="evaluates only"):
        reader.run()
    monkeypatch.undo()
    writer.close()
    assert not (run / lock.LOCK_FILE).exists()
    assert Trainer(config.load(cfg)).run()["steps"] == 2  # free again; run() releases it
    assert not (run / lock.LOCK_FILE).exists()


def test_a_writer_that_fails_while_being_built_releases_the_lock(make_config, tmp_path):
    from mixtune.errors import DataError

    cfg, run = _write(make_config, tmp_path, max_steps=2)
    cfg_obj = config.load(cfg)
    Path(cfg_obj.datasets[0].path).write_text("{not json\n")  # found only when data is read
    with pytest.raises(DataError):
        Trainer(cfg_obj)
    assert not run.exists()  # the lock created the directory, and its release removed it


def test_a_second_trainer_in_one_process_is_told_to_close_the_first(make_config, tmp_path):
    """A notebook or script that builds two Trainers on one output_dir: the second is refused
    naming this process and the fix (close() the first); after close() it starts."""
    raw = make_config(max_steps=1, output_dir=str(tmp_path / "run"))
    first = Trainer(config.load(data=raw))
    with pytest.raises(lock.RunDirLocked, match=r"this very process: close\(\) its other Trainer"):
        Trainer(config.load(data=raw))
    first.close()
    Trainer(config.load(data=raw)).close()
