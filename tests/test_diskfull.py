"""A disk that refuses a write (full, over quota, read-only, permission denied), at every kind of
write site of a run, through the CLI: one line naming what was being written, where, and the
last complete checkpoint; exit 1; nothing half-written left as final/ or the latest checkpoint;
and, with room again, the same command resumes to exactly the uninterrupted run's model.

The failures are injected where the writers report them, as they report them: ``OSError``
(ENOSPC, EROFS) from Python's file writes, torch's ``[enforce fail ...] unexpected pos`` from
``torch.save``, safetensors' ``SafetensorError`` with os error 28. One test fills a real 2 MB
tmpfs (``unshare``, no root needed where user namespaces are allowed)."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from conftest import addition_records, reverse_records, tiny_config, write_jsonl
from mixtune import cli
from mixtune.engine import answer, build, checkpoint, integrity, lock

ENOSPC = OSError(errno.ENOSPC, "No space left on device")
TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
SAFETENSORS_FULL = SafetensorError(
    "Error while serializing: I/O error: No space left on device (os error 28)"
)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A 6-step run with a target and a constraint (so final/, final-last/, selection.json and
    weights-only copies are all written), and its uninterrupted reference."""
    root = tmp_path_factory.mktemp("diskfull")
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "add.jsonl", addition_records(200))
    write_jsonl(data / "rev.jsonl", reverse_records(120))
    raw = tiny_config(root, data, max_steps=6)
    raw["train"].update(save_every=2, eval_every=2, log_every=2, keep_checkpoints=10)
    raw["evals"][0]["role"] = "target"
    raw["evals"][1]["role"] = "constraint"
    (root / "base.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["train", str(_config(root, "ref"))]) == 0
    return root


def _config(root: Path, name: str) -> Path:
    raw = yaml.safe_load((root / "base.yaml").read_text())
    raw["output_dir"] = str(root / name)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _model(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def _steps(run: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _fail(monkeypatch, owner, name: str, when, error: Exception, partial: bool = False):
    """Make ``owner.name(...)`` raise ``error`` the first time ``when(*args)`` holds (after
    doing its work when ``partial``: the write went through, the writer then failed)."""
    real, fired = getattr(owner, name), []

    def failing(*args, **kwargs):
        if not fired and when(*args):
            fired.append(args)
            if partial:
                real(*args, **kwargs)
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return fired


class _HalfWriter:
    """A file whose ``write`` puts half the text on the disk, then finds it full."""

    def __init__(self, f):
        self.f = f

    def write(self, text):
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _metrics_full(monkeypatch):
    from mixtune.engine import rundir

    appends = []

    def opener(path, mode="r", *a, **kw):
        f = open(path, mode, *a, **kw)
        if mode.startswith("a") and Path(path).name == "metrics.jsonl":
            appends.append(path)
            if len(appends) == 3:  # the record of step 4 (after 0 and 2)
                return _HalfWriter(f)
        return f

    monkeypatch.setattr(rundir, "open", opener, raising=False)
    return appends


def _write_text_fails(name: str, error: OSError):
    def install(monkeypatch):
        return _fail(monkeypatch, pathlib.Path, "write_text", lambda p, *a: name in p.name, error)

    return install


# (case, install the failure, what the line names, last complete checkpoint at the failure)
CASES = {
    "metrics.jsonl": (_metrics_full, "while writing metrics.jsonl in", "step-000002"),
    "summary.json": (
        _write_text_fails("summary.json", ENOSPC),
        "while writing summary.json in",
        "step-000006",
    ),
    "run record, read-only": (
        _write_text_fails("config.yaml", OSError(errno.EROFS, "Read-only file system")),
        "read-only file system while writing the run's record",
        "none",
    ),
    "checkpoint (torch)": (
        lambda mp: _fail(
            mp,
            torch,
            "save",
            lambda obj, f, *a: ".tmp-step-000004" in str(getattr(f, "name", f)),
            TORCH_FULL,
        ),
        "while writing checkpoint step 4 in",
        "step-000002",
    ),
    "weights-only copy": (
        lambda mp: _fail(mp, answer, "save_file", lambda t, f, *a: "000004" in f, SAFETENSORS_FULL),
        "while writing the weights-only copy of step 4 in",
        "step-000002",
    ),
    "final/ (safetensors)": (
        lambda mp: _fail(mp, build, "save_final", lambda *a: True, SAFETENSORS_FULL, partial=True),
        "while writing the final model (final/) in",
        "step-000006",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_refused_write_is_one_line_exit_1_and_the_same_command_resumes_exactly(
    root, case, monkeypatch, capsys
):
    install, said, last = CASES[case]
    name = case.split()[0].strip("/()").replace(".", "_")
    cfg, run = _config(root, name), root / name
    fired = install(monkeypatch)
    capsys.readouterr()
    assert cli.main(["train", str(cfg)]) == 1
    assert fired, "the failure was never injected"
    monkeypatch.undo()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mixtune")]
    assert len(err) == 1, err
    problem = "read-only file system" if "read-only" in case else "no space left on device"
    assert err[0].startswith(f"mixtune: error: {problem} while writing"), err
    assert said in err[0] and f"the last complete checkpoint is {last}:" in err[0], err
    # Nothing half-written taken for finished: no final/ (unless whole), no temporary leftovers
    # named like a checkpoint, every listed checkpoint intact, no partial metrics line.
    if (run / "final").exists():  # only whole, when what failed came after it
        assert case == "summary.json" and (run / "final" / "selection.json").is_file()
    assert not list(run.glob("**/.tmp-*")), list(run.glob("**/.tmp-*"))
    listed = checkpoint.listed(run / "checkpoints")
    assert [p.name for p in listed][-1:] == ([] if last == "none" else [last])
    assert all(integrity.problem(p) is None for p in listed)
    if (run / "metrics.jsonl").is_file():
        assert (run / "metrics.jsonl").read_text().endswith(("\n", ""))
        assert all(ln.endswith("}") for ln in (run / "metrics.jsonl").read_text().splitlines())
    assert not (run / lock.LOCK_FILE).exists()
    # Room again: the same command resumes, and ends exactly where the uninterrupted run did.
    assert cli.main(["train", str(cfg)]) == 0
    ref, got = _model(root / "ref"), _model(run)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert _steps(run) == _steps(root / "ref")
    sel = json.loads((run / "final" / "selection.json").read_text())
    assert sel["step"] == json.loads((root / "ref/final/selection.json").read_text())["step"]


def test_an_unwrapped_write_site_still_ends_in_one_line(root, monkeypatch, capsys):
    """The CLI recognises a refused write wherever it happens (here: the report's HTML)."""
    _fail(
        monkeypatch,
        pathlib.Path,
        "write_text",
        lambda p, *a: p.name == "index.html",
        OSError(errno.ENOSPC, "No space left on device", "index.html"),
    )
    capsys.readouterr()
    assert cli.main(["report", str(root / "ref")]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mixtune")]
    assert len(err) == 1 and "no space left on device while writing index.html" in err[0], err


def test_an_unusable_token_cache_is_skipped(root, monkeypatch, capsys):
    monkeypatch.setenv("MIXTUNE_CACHE_DIR", str(root / "base.yaml" / "cache"))  # under a file
    cfg = _config(root, "nocache")
    assert cli.main(["train", str(cfg), "max_steps=2"]) == 0


def test_the_error_handler_degrades_to_stderr_when_nothing_is_writable(root, monkeypatch, capsys):
    """An unexpected failure with logs/ unwritable and no usable temporary directory: the
    traceback goes to stderr, once, with no second traceback from the handler."""
    from mixtune.engine.loop import Trainer

    cfg = _config(root, "nowhere")
    denied = OSError(errno.EACCES, "Permission denied")
    _fail(monkeypatch, pathlib.Path, "write_text", lambda p, *a: "error" in p.name, denied)

    def boom(self, stop_after):
        raise RuntimeError("boom")

    monkeypatch.setattr(Trainer, "_start", boom)
    monkeypatch.setattr(tempfile, "tempdir", str(root / "base.yaml" / "tmp"))  # under a file
    capsys.readouterr()
    assert cli.main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "mixtune: unexpected failure: RuntimeError: boom" in err
    assert "traceback above: no writable place to keep it" in err
    assert err.count("Traceback (most recent call last)") == 1, err
    assert "During handling of the above exception" not in err
    assert not (root / "nowhere" / "logs" / "error.log").exists()


# -- a real full disk ------------------------------------------------------------------------------
def _unshare_problem() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>&1 || exit 3"],
        capture_output=True,
        text=True,
    )
    if probe.returncode:
        return (
            "this machine does not let an unprivileged user mount a tmpfs in a user namespace "
            f"(unshare -rm: {(probe.stderr or probe.stdout).strip()[:120]})"
        )
    return None


def test_a_real_full_tmpfs_then_room_again_resumes_exactly(root, tmp_path):
    why = _unshare_problem()
    if why:
        pytest.skip(why)
    mnt, keep = tmp_path / "mnt", tmp_path / "kept"
    mnt.mkdir()
    cfg = _config(root, "tmpfs")
    raw = yaml.safe_load(cfg.read_text())
    raw["output_dir"] = str(mnt / "run")
    raw["train"]["save_every"] = 1
    cfg.write_text(yaml.safe_dump(raw))
    py = f"{sys.executable} -m mixtune.cli train {cfg}"
    script = (
        f"mount -t tmpfs -o size=1200k tmpfs {mnt} || exit 90\n"
        f"MIXTUNE_CACHE_DIR={mnt}/cache {py} 2>{tmp_path}/err1; echo $? > {tmp_path}/rc1\n"
        f"ls -a {mnt}/run {mnt}/run/checkpoints > {tmp_path}/ls1 2>&1\n"
        f"mount -o remount,size=64m {mnt} || exit 91\n"
        f"MIXTUNE_CACHE_DIR={mnt}/cache {py} 2>{tmp_path}/err2; echo $? > {tmp_path}/rc2\n"
        f"cp -r {mnt}/run {keep}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, timeout=600)
    assert done.returncode == 0, done
    rc1, err1 = (tmp_path / "rc1").read_text().strip(), (tmp_path / "err1").read_text()
    said = [ln for ln in err1.splitlines() if ln.startswith("mixtune")]
    assert rc1 == "1" and len(said) == 1, (rc1, err1[-3000:])
    assert said[0].startswith("mixtune: error: no space left on device while writing "), said
    assert "the last complete checkpoint is step-" in said[0], said
    print(said[0])
    assert "final" not in (tmp_path / "ls1").read_text().split()
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()[-3000:]
    ref, got = _model(root / "ref"), _model(keep)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert _steps(keep) == _steps(root / "ref")
