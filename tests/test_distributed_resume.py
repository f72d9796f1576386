"""2-process runs that stop and resume, through the real CLI under torchrun.

The run mixes a **streamed** dataset (JSONL shards, block shuffle) with an in-memory one under
DynamixSFT (look-ahead rewards drawn from the stream's block). SIGTERM goes to the whole launch
(the launcher and both ranks, as a cluster scheduler or Ctrl-C sends it): both ranks stop after
the same step, write one checkpoint and exit 143; the same command resumes. The resumed run's
metrics (weights, losses, evaluations) and final parameters equal an uninterrupted 2-process
run's exactly, and a 1-process run's to floating-point tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY_MODEL, addition_records, reverse_records, write_jsonl
from mixtune import config
from mixtune.engine import checkpoint
from mixtune.engine.loop import Trainer
from test_streaming import _strip

MAX_STEPS = 12


def _raw(tmp: Path, out: str) -> dict:
    data = tmp / "data"
    if not data.is_dir():
        (data / "shards").mkdir(parents=True)
        recs = addition_records(90, seed=4)
        for k in range(3):
            write_jsonl(data / "shards" / f"part-{k}.jsonl", recs[k::3])
        write_jsonl(data / "add_eval.jsonl", addition_records(16, seed=9))
        write_jsonl(data / "rev.jsonl", reverse_records(80))
    return {
        "output_dir": str(tmp / out),
        "seed": 2,
        "max_steps": MAX_STEPS,
        "progress": False,
        "model": {"tokenizer": "byte", "config": dict(TINY_MODEL)},
        "datasets": [
            {"name": "add", "path": str(data / "shards"), "streaming": True, "shuffle_buffer": 16},
            {"name": "rev", "path": str(data / "rev.jsonl")},
        ],
        "evals": [
            {
                "name": "add",
                "path": str(data / "add_eval.jsonl"),
                "batches": 2,
                "batch_size": 4,
                "accuracy": False,
            },
            {
                "name": "rev",
                "from_dataset": "rev",
                "holdout": 8,
                "batches": 2,
                "batch_size": 4,
                "accuracy": False,
            },
        ],
        "mixer": {"name": "dynamixsft", "update_every": 2, "batch_size": 4},
        "train": {
            "batch_size": 8,
            "micro_batch_size": 2,
            "lr": 3e-3,
            "max_length": 48,
            "eval_every": 4,
            "log_every": 1,
            "save_every": 0,
        },
    }


def _launch(cfg_path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [
            shutil.which("torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "mixtune.cli",
            "train",
            str(cfg_path),
        ],
        env=env,
        stdout=open(log, "a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _finish(cfg_path: Path, log: Path) -> None:
    """Run to the end."""
    code = _launch(cfg_path, log).wait(600)
    assert code == 0, log.read_text()[-3000:]


def sigterm_after(cfg_path: Path, run: Path, log: Path, step: int) -> None:
    """Launch ``cfg_path``; once ``run`` logged ``step``, SIGTERM the launcher and both ranks
    (its process group) and wait for them to stop."""
    proc = _launch(cfg_path, log)
    t0 = time.monotonic()
    while _max_step(run) < step:
        assert proc.poll() is None and time.monotonic() - t0 < 300, log.read_text()[-3000:]
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(120)


def _metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [_strip(json.loads(ln)) for ln in lines if ln]


def _max_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    steps = [-1]
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
    return max(steps)


def _params(run: Path) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{MAX_STEPS:06d}" / "trainable.safetensors"))


@pytest.mark.dist
def test_streaming_sigterm_resume_two_processes(tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not available")
    # The uninterrupted 2-process run.
    ref_cfg = tmp_path / "ref.yaml"
    ref_cfg.write_text(yaml.safe_dump(_raw(tmp_path, "ref")))
    _finish(ref_cfg, tmp_path / "ref.log")
    ref_run = tmp_path / "ref"

    # The same run, stopped by SIGTERM to the launcher and both ranks, then resumed.
    raw = _raw(tmp_path, "sig")
    run = Path(raw["output_dir"])
    cfg_path = tmp_path / "sig.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    log = tmp_path / "sig.log"
    sigterm_after(cfg_path, run, log, 3)
    text = log.read_text()
    found = checkpoint.complete(run / "checkpoints")
    assert len(found) == 1, text[-3000:]
    step = int(found[0].name.removeprefix("step-"))
    assert 3 <= step < MAX_STEPS, text[-3000:]
    # Both ranks stopped after the same step (else the checkpoint's collectives would not have
    # completed); rank 0 says how to go on.
    stopped = f"stopped by SIGTERM after step {step}; checkpoint saved in {run / 'checkpoints'}"
    assert text.count("SIGTERM received: stopping after this step") == 2, text[-3000:]
    assert text.count(stopped) == 1, text[-3000:]
    assert "Traceback" not in text.split(stopped)[0], text[-3000:]
    assert _max_step(run) == step

    _finish(cfg_path, log)
    assert _metrics(run) == _metrics(ref_run)
    got, want = _params(run), _params(ref_run)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    sampler = [
        json.loads((r / "checkpoints" / f"step-{MAX_STEPS:06d}" / "sampler.json").read_text())
        for r in (run, ref_run)
    ]
    assert sampler[0] == sampler[1]
    assert any(r["weights"] != {"add": 0.5, "rev": 0.5} for r in _metrics(run) if "weights" in r), (
        "the mixer never moved"
    )

    # One process on the same global batches: the same trajectory to fp tolerance.
    single = _raw(tmp_path, "single")
    single["train"]["save_every"] = MAX_STEPS
    Trainer(config.load(data=single)).run()
    one, two = _metrics(tmp_path / "single"), _metrics(ref_run)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        if "weights" in b:
            assert a["weights"] == pytest.approx(b["weights"], abs=1e-5), a["step"]
    p1 = _params(tmp_path / "single")
    for name in want:
        torch.testing.assert_close(p1[name], want[name], rtol=1e-4, atol=1e-5)


@pytest.mark.dist
def test_a_failing_rank_stops_the_run_without_a_hang(tmp_path):
    """Rank 0 fails mid-run (its metrics file turns into a directory): the launch ends within
    seconds instead of leaving rank 1 waiting in a collective, rank 0's traceback is kept
    (not overwritten by rank 1's "connection reset"), and the last checkpoint stays good."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not available")
    raw = _raw(tmp_path, "fail")
    raw["max_steps"] = 200
    raw["train"]["save_every"] = 2
    run = Path(raw["output_dir"])
    cfg_path = tmp_path / "fail.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    log = tmp_path / "fail.log"
    proc = _launch(cfg_path, log)
    t0 = time.monotonic()
    while not checkpoint.complete(run / "checkpoints"):
        assert proc.poll() is None and time.monotonic() - t0 < 300, log.read_text()[-3000:]
        time.sleep(0.01)
    for _ in range(100):  # rank 0 may re-create the file between the two calls: again
        try:
            (run / "metrics.jsonl").unlink(missing_ok=True)
            (run / "metrics.jsonl").mkdir()
            break
        except FileExistsError:
            continue
    t1 = time.monotonic()
    code = proc.wait(120)
    assert code != 0 and time.monotonic() - t1 < 60
    text = log.read_text()
    assert "mixtune: unexpected failure: IsADirectoryError" in text, text[-3000:]
    assert "IsADirectoryError" in (run / "logs" / "error.log").read_text()
    last = checkpoint.complete(run / "checkpoints")[-1]
    assert load_file(str(last / "trainable.safetensors"))  # loads: not corrupted
