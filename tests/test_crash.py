"""Crash safety: SIGKILL at random points (mid-step, mid-checkpoint-write, mid-startup), resume
with resume=auto until done; SIGINT/SIGTERM stop gracefully with a checkpoint.

The run under test is the real CLI (`mixtune train CONFIG`) in a child process: forked from this
process for the fast tests (no re-import of torch), a fresh `python -m mixtune.cli` for the slow
one. An uninterrupted in-process run of the same config is the reference; it keeps every
checkpoint, so each surviving checkpoint of the crashed run is compared with the reference's
checkpoint of the same step.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
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

PAUSE = 0.3  # seconds the checkpoint writer sleeps mid-write when a test asks for it


def _raw(tmp: Path, max_steps: int, out: str) -> dict:
    data = tmp / "data"
    if not data.is_dir():
        data.mkdir()
        write_jsonl(data / "add.jsonl", addition_records(120))
        write_jsonl(data / "rev.jsonl", reverse_records(80))
    return {
        "output_dir": str(tmp / out),
        "seed": 3,
        "max_steps": max_steps,
        "progress": False,
        "model": {"tokenizer": "byte", "config": dict(TINY_MODEL)},
        "datasets": [
            {"name": "add", "path": str(data / "add.jsonl")},
            {"name": "rev", "path": str(data / "rev.jsonl")},
        ],
        "evals": [
            {
                "name": "add",
                "from_dataset": "add",
                "holdout": 8,
                "batches": 1,
                "batch_size": 8,
                "accuracy": False,
            }
        ],
        # EXP3 at every step: the weights depend on the whole loss history, so a resume that
        # loses or repeats anything shows up in the trajectory.
        "mixer": {"name": "exp3", "update_every": 1, "warmup_steps": 2},
        "train": {
            "batch_size": 4,
            "lr": 3e-3,
            "max_length": 48,
            "eval_every": 4,
            "log_every": 1,
            "save_every": 2,
            "keep_checkpoints": 2,
        },
    }


class Child:
    """``mixtune train CONFIG`` in a child process (forked, or a fresh interpreter)."""

    def __init__(self, cfg_path: Path, log: Path, fork: bool, env: dict | None = None):
        self.log = log
        env = {"OMP_NUM_THREADS": "1", **(env or {})}
        argv = ["train", str(cfg_path)]
        if not fork:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mixtune.cli", *argv],
                env={**os.environ, **env},
                stdout=open(log, "a"),
                stderr=subprocess.STDOUT,
            )
            self.pid, self.code = self.proc.pid, None
            return
        self.proc, self.code = None, None
        self.pid = os.fork()
        if self.pid == 0:  # the child: run the CLI, never return into pytest
            code = 99
            try:
                os.environ.update(env)
                sys.stdout = sys.stderr = open(log, "a", buffering=1)
                from mixtune import cli

                code = cli.main(argv)
            finally:
                os._exit(code)

    def poll(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        if self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def wait(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > end:
                self.send(signal.SIGKILL)
                self.wait(10)
                raise AssertionError(f"child did not finish in {timeout} s:\n{self.output()}")
            time.sleep(0.01)
        return self.poll()

    def send(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def output(self) -> str:
        return self.log.read_text() if self.log.is_file() else ""


def _max_step(run: Path) -> int:
    """Highest step in metrics.jsonl (ignoring a line cut short by a kill)."""
    best = -1
    path = run / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                best = max(best, json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
    return best


def _starts(child: Child) -> int:
    text = child.output()
    return text.count("resuming from ") + text.count("training [")


def _new_tmp_dir(run: Path, since_ns: int) -> bool:
    """A checkpoint is being written: a ``.tmp-step-*`` directory created after ``since_ns``.
    (Not by name or inode: a stale one of the same step is deleted and recreated, often
    with the same inode.)"""
    root = run / "checkpoints"
    try:
        return any(
            p.name.startswith(".tmp-step") and p.stat().st_ctime_ns > since_ns
            for p in root.iterdir()
        )
    except FileNotFoundError:  # no checkpoints yet, or the directory vanished mid-listing
        return False


def _latest_step(run: Path) -> int:
    found = checkpoint.complete(run / "checkpoints")
    return int(found[-1].name.removeprefix("step-")) if found else 0


def _strip(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def _read_metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("crash")


_REFERENCES: dict = {}


def _reference(workdir: Path, max_steps: int) -> tuple[Trainer, Path]:
    """The uninterrupted run, keeping every checkpoint (one per max_steps per module)."""
    key = (workdir, max_steps)
    if key not in _REFERENCES:
        raw = _raw(workdir, max_steps, f"ref{max_steps}")
        raw["train"]["keep_checkpoints"] = 1000
        ref = Trainer(config.load(data=raw))
        ref.run()
        _REFERENCES[key] = ref, ref.rundir.path
    return _REFERENCES[key]


def _same_checkpoint(ckpt: Path, ref_run: Path, ref: Trainer) -> None:
    """``ckpt`` loads, and holds exactly the reference's state at its step."""
    state, _ = checkpoint.load(
        ckpt,
        accelerator=ref.acc,
        model=ref.model,
        optimizer=ref.optimizer,
        scheduler=ref.scheduler,
        sampler=ref.sampler,
        mixer=ref.mixer,
        loss=ref.loss_fn,
    )
    twin = ref_run / "checkpoints" / ckpt.name
    assert state["step"] == int(ckpt.name.removeprefix("step-"))
    got, want = (load_file(str(p / "trainable.safetensors")) for p in (ckpt, twin))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    for name in ("sampler.json",):
        assert (ckpt / name).read_text() == (twin / name).read_text()
    assert torch.load(ckpt / "mixer.pt", weights_only=False) == torch.load(
        twin / "mixer.pt", weights_only=False
    )


def _crash_and_resume(workdir: Path, kills: int, max_steps: int, fork: bool, seed: int):
    ref, ref_run = _reference(workdir, max_steps)
    raw = _raw(workdir, max_steps, f"crash-{seed}")
    run = Path(raw["output_dir"])
    cfg_path = workdir / f"crash-{seed}.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    rng = random.Random(seed)
    log = workdir / f"crash-{seed}.log"
    ref_records = _read_metrics(ref_run)
    step_s = max(ref_records[-1]["time"] / max_steps, 1e-3)
    startup = 0.3 if fork else 10.0  # "start" kills: in setup/resume, or imports (exec)
    done_kills, modes = 0, []
    while done_kills < kills:
        latest, seen = _latest_step(run), max(_latest_step(run), _max_step(run))
        mode = rng.choices(["step", "write", "start"], [0.5, 0.35, 0.15])[0]
        if mode == "step" and seen + 1 > max_steps - 3:
            mode = "write"  # near the end: always kill inside the next checkpoint write
        env = {"MIXTUNE_TEST_CHECKPOINT_PAUSE": str(PAUSE)} if mode == "write" else {}
        launched = time.time_ns()
        child = Child(cfg_path, log, fork, env)
        t0 = time.monotonic()
        if mode == "step":
            target = rng.randint(seen + 1, min(seen + 3, max_steps - 3))
            trigger = lambda: _max_step(run) >= target  # noqa: E731
        elif mode == "write":
            trigger = lambda: _new_tmp_dir(run, launched)  # noqa: E731
        else:  # a random moment before training starts (a fresh interpreter logs the start)
            delay, started = rng.uniform(0, startup), _starts(child)
            trigger = lambda: time.monotonic() - t0 >= delay or _starts(child) > started  # noqa: E731
        while not trigger():
            assert child.poll() is None, f"child exited early ({mode}):\n{child.output()}"
            assert time.monotonic() - t0 < 120, f"no trigger ({mode}):\n{child.output()}"
            time.sleep(0.005)
        if mode == "step":
            # Somewhere inside the next step: never more than half a step (the reference's
            # mean step time), so a fast machine cannot run past the final checkpoint.
            time.sleep(rng.uniform(0, min(0.05, 0.5 * step_s)))
        elif mode == "write":
            time.sleep(rng.uniform(0, PAUSE * 0.9))  # the checkpoint is half written
        child.send(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL, f"{mode}:\n{child.output()[-1500:]}"
        done_kills += 1
        modes.append(mode)
        # The latest checkpoint is never corrupted: it loads and equals the reference's.
        assert _latest_step(run) >= latest
        found = checkpoint.complete(run / "checkpoints")
        if found:
            _same_checkpoint(found[-1], ref_run, ref)
    child = Child(cfg_path, log, fork)
    assert child.wait(300) == 0, child.output()
    assert modes.count("write") >= 1 and modes.count("step") >= 1, modes

    final = run / "checkpoints" / f"step-{max_steps:06d}"
    _same_checkpoint(final, ref_run, ref)
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())
    ours, theirs = _read_metrics(run), _read_metrics(ref_run)
    assert [r["step"] for r in ours] == list(range(max_steps + 1))  # no duplicates, no gaps
    assert _strip(ours) == _strip(theirs)
    assert len({r["weights"]["add"] for r in ours}) > 5, "the mixer must move the weights"
    return modes


def test_sigkill_resume_equals_uninterrupted(workdir):
    _crash_and_resume(workdir, kills=5, max_steps=14, fork=True, seed=0)


@pytest.mark.slow
def test_sigkill_20_times_real_cli(workdir):
    modes = _crash_and_resume(workdir, kills=22, max_steps=40, fork=False, seed=1)
    assert len(modes) >= 20
    print({m: modes.count(m) for m in set(modes)})  # with -s: kills per kind


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_sigint_checkpoint_and_resume(workdir, sig, code):
    max_steps = 14
    ref, ref_run = _reference(workdir, max_steps)
    raw = _raw(workdir, max_steps, f"sig{code}")
    raw["train"]["save_every"] = 0  # the only checkpoint before the end is the signal's
    run = Path(raw["output_dir"])
    cfg_path = workdir / f"sig{code}.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    child = Child(cfg_path, workdir / f"sig{code}.log", fork=True)
    t0 = time.monotonic()
    while _max_step(run) < 3:
        assert child.poll() is None and time.monotonic() - t0 < 120, child.output()
        time.sleep(0.005)
    child.send(sig)
    assert child.wait(60) == code, child.output()
    last = child.output().strip().splitlines()[-1]
    step = _latest_step(run)
    assert 3 <= step < max_steps
    name = signal.Signals(sig).name
    assert last == (
        f"mixtune: stopped by {name} after step {step}; checkpoint saved in "
        f"{run / 'checkpoints'}; run the same command again to resume"
    ), last
    assert "Traceback" not in child.output()
    resumed = Child(cfg_path, workdir / f"sig{code}.log", fork=True)
    assert resumed.wait(120) == 0, resumed.output()
    _same_checkpoint(run / "checkpoints" / f"step-{max_steps:06d}", ref_run, ref)
    assert _strip(_read_metrics(run)) == _strip(_read_metrics(ref_run))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
def test_checkpoint_is_fsynced_before_it_is_renamed_into_place(workdir, monkeypatch):
    """Every file, then the directory, then (after the rename) its parent reach the disk."""
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    raw = _raw(workdir, 2, "fsync")
    Trainer(config.load(data=raw)).run()
    root = Path(raw["output_dir"]) / "checkpoints"
    tmp = root / ".tmp-step-000002"
    files = {
        "trainable.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "sampler.json",
        "mixer.pt",
        "rank0.pt",
        "state.json",
    }
    assert files <= {p.name for p in synced if p.parent == tmp}
    order = [synced.index(tmp / "state.json"), synced.index(tmp), synced.index(root)]
    assert order == sorted(order)
    assert all(synced.index(tmp / f) < order[0] for f in files - {"state.json"})
    assert (root / "step-000002" / "state.json").is_file()


def test_resume_drops_a_metrics_line_cut_short(workdir):
    """A kill mid-append leaves half a JSON line; resuming must not choke on it."""
    from mixtune.engine.rundir import RunDir

    cfg = config.load(data=_raw(workdir, 6, "cut"))
    rundir = RunDir(cfg.output_dir)
    rundir.path.mkdir(parents=True)
    lines = [json.dumps({"step": s, "weights": {"add": 0.5}}) for s in range(6)]
    rundir.metrics.write_text("\n".join(lines) + '\n{"step": 6, "weig')
    rundir.start(cfg, 3)
    assert _read_metrics(rundir.path) == [json.loads(ln) for ln in lines[:4]]
