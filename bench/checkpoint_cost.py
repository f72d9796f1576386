"""What self-verifying checkpoints cost: writing the manifest and verifying it, against a whole
checkpoint save, on the embedded model (full fine-tuning: the largest trainable state here).

    python bench/checkpoint_cost.py [--repeats 8]

Trains configs/static.yaml for one step, then times ``checkpoint.save`` of that state
(``repeats`` times, alternating with manifest writing switched off), ``integrity.write_manifest``
and ``integrity.problem`` (the verification a resume does) on the saved checkpoint. Medians.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

from mixtune import config
from mixtune.engine import checkpoint, integrity
from mixtune.engine.loop import Trainer

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        cfg = config.load(
            ROOT / "configs/static.yaml", [f"output_dir={d}/run", "max_steps=1", "progress=false"]
        )
        t = Trainer(cfg)
        t.run()
        ckpt = checkpoint.complete(t.rundir.checkpoints)[-1]
        size = sum(f.stat().st_size for f in ckpt.iterdir())
        with_m, without_m = [], []
        for i in range(args.repeats):
            for on, out in ((False, without_m), (True, with_m)):  # with last: it stays
                off = mock.patch.object(checkpoint, "write_manifest", lambda tmp: None)
                with contextlib.nullcontext() if on else off:
                    t0 = time.perf_counter()
                    t._save(time.perf_counter(), 0.0)
                    out.append(time.perf_counter() - t0)
        ckpt = checkpoint.complete(t.rundir.checkpoints)[-1]
        write, verify = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            integrity.write_manifest(ckpt)
            write.append(time.perf_counter() - t0)
            integrity._CHECKED.clear()
            t0 = time.perf_counter()
            assert integrity.problem(ckpt) is None
            verify.append(time.perf_counter() - t0)
    ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    print(f"checkpoint: {size / 1e6:.1f} MB, {args.repeats} repeats, medians")
    print(
        f"save with manifest {ms(with_m):.1f} ms, without {ms(without_m):.1f} ms "
        f"(ratio {statistics.median(with_m) / statistics.median(without_m):.3f})"
    )
    print(
        f"write_manifest {ms(write):.1f} ms, verify {ms(verify):.1f} ms "
        f"({size / 1e6 / statistics.median(verify) / 1000:.2f} GB/s)"
    )


if __name__ == "__main__":
    main()
