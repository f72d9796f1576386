"""What self-verifying checkpoints cost: the manifest's SHA-256s against a whole checkpoint save,
on the embedded model (full fine-tuning: the largest trainable state here).

    python bench/checkpoint_cost.py [--repeats 8]

Trains configs/static.yaml for one step, then times ``checkpoint.save`` of that state,
``repeats`` times in each of three ways, interleaved (so that a change of load on a shared machine
hits all three alike):

- ``none``: no manifest, and no SHA-256 computed while the files are written (the baseline);
- ``reread``: the files written without hashing, then read back and hashed for the manifest
  (how saves worked before the files were hashed while written);
- ``while writing``: what a save does now (each file hashed on its way out, nothing read back).

Each with the files fsync'd (what a save does) and again with fsync switched off (page-cache
writes only: the CPU cost alone, without the disk's latency, which on a shared disk varies far
more than the hashing costs). Wall-clock and process CPU time (one torch thread while timing),
medians. Then
``integrity.problem`` (the verification a resume does) on the saved checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

from mixtune import config
from mixtune.engine import checkpoint, integrity
from mixtune.engine.loop import Trainer

ROOT = Path(__file__).resolve().parent.parent


class _NoHash:
    """Stands in for SHA-256 where a save is timed without hashing."""

    def __init__(self, data=b""):
        pass

    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def _reread(tmp, known=None) -> None:
    with mock.patch.object(integrity, "hashlib", hashlib):  # real hashing, files read back
        integrity.write_manifest(tmp)


@contextlib.contextmanager
def _mode(mode: str, sync: bool):
    with contextlib.ExitStack() as stack:
        if not sync:
            stack.enter_context(mock.patch.object(os, "fsync", lambda fd: None))
        if mode != "while writing":  # no hashing while the files are written
            unhashed = SimpleNamespace(sha256=_NoHash)
            stack.enter_context(mock.patch.object(integrity, "hashlib", unhashed))
            manifest = (lambda tmp, known=None: None) if mode == "none" else _reread
            stack.enter_context(mock.patch.object(checkpoint, "write_manifest", manifest))
        yield


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    modes = ("none", "reread", "while writing")  # the last one last: its checkpoint stays
    with tempfile.TemporaryDirectory() as d:
        cfg = config.load(
            ROOT / "configs/static.yaml", [f"output_dir={d}/run", "max_steps=1", "progress=false"]
        )
        t = Trainer(cfg)
        t.run()
        ckpt = checkpoint.complete(t.rundir.checkpoints)[-1]
        size = sum(f.stat().st_size for f in ckpt.iterdir())
        # One thread while timing: idle intra-op threads spinning after training would be
        # counted as this process's CPU time (a save copies tensors, it computes nothing).
        torch.set_num_threads(1)
        wall = {(m, s): [] for m in modes for s in (True, False)}
        cpu = {k: [] for k in wall}
        for _ in range(args.repeats):
            for sync in (False, True):
                for mode in modes:
                    with _mode(mode, sync):
                        t0, c0 = time.perf_counter(), time.process_time()
                        t._save(time.perf_counter(), 0.0)
                        wall[mode, sync].append(time.perf_counter() - t0)
                        cpu[mode, sync].append(time.process_time() - c0)
        ckpt = checkpoint.complete(t.rundir.checkpoints)[-1]
        verify = []
        for _ in range(args.repeats):
            integrity._CHECKED.clear()
            t0 = time.perf_counter()
            assert integrity.problem(ckpt) is None
            verify.append(time.perf_counter() - t0)
    med = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    print(f"checkpoint: {size / 1e6:.1f} MB, {args.repeats} repeats, medians (ms)")
    print("| save | fsync: wall | CPU | no fsync: wall | CPU |")
    print("|---|---|---|---|---|")
    for mode in modes:
        cells = []
        for sync in (True, False):
            for series in (wall, cpu):
                base = med(series["none", sync])
                v = med(series[mode, sync])
                cells.append(f"{v:.1f}" + ("" if mode == "none" else f" ({v / base:.2f}x)"))
        print(f"| {mode} | " + " | ".join(cells) + " |")
    v = statistics.median(verify)
    print(f"verify (what a resume does): {1000 * v:.1f} ms ({size / 1e9 / v:.2f} GB/s)")


if __name__ == "__main__":
    main()
