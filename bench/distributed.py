"""1- vs 2-process agreement per mixer, and 2- vs 1-process wall time (CPU, gloo).

    python bench/distributed.py                  # every case of tests/test_distributed.py
    python bench/distributed.py --quick          # 3 cases, 1 timing repeat, fewer steps
    python bench/distributed.py --cases dynamics exp3 --repeats 5

Agreement: each case of ``tests/test_distributed.py`` (tiny llama, byte tokenizer, 6 steps of
8 examples, micro-batches of 2) runs once under ``torchrun --nproc_per_node 2`` and once as a
plain process through the same worker (``tests/dist_worker.py``); we report the largest
absolute difference of the final parameters and of the weights over all updates, and whether
the two ranks' weights were bit-identical. Timing: one config on the built-in base model
(1-process with 1 and 2 threads, 2 processes x 1 thread), interleaved, medians. Writes
``bench/results/distributed.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))

import conftest  # noqa: E402
from test_distributed import CASES, case_config  # noqa: E402


def run_worker(
    raw: dict, work: Path, procs: int, threads: int = 1
) -> tuple[dict, torch.Tensor, float]:
    """Run the worker on ``raw`` with ``procs`` processes; (result, params, wall seconds)."""
    work.mkdir(parents=True, exist_ok=True)
    raw = {**raw, "output_dir": str(work / "run")}
    (work / "cfg.json").write_text(json.dumps(raw))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    args = [str(TESTS / "dist_worker.py"), str(work / "cfg.json"), str(work / "out.json")]
    if procs > 1:
        cmd = [shutil.which("torchrun"), "--standalone", "--nproc_per_node", str(procs), *args]
    else:
        cmd = [sys.executable, *args]
    shutil.rmtree(work / "run", ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    res = json.loads((work / "out.json").read_text())
    return res, torch.load(work / "out.json.params.pt"), wall


def agreement(name: str, tmp: Path, data_dir: Path) -> dict:
    raw = case_config(lambda **top: conftest.tiny_config(tmp, data_dir, **top), tmp, name)
    one, p1, _ = run_worker(raw, tmp / f"{name}-1", 1)
    two, p2, _ = run_worker(raw, tmp / f"{name}-2", 2)
    u1, (u2a, u2b) = one["updates"][0], two["updates"]
    dw = max(abs(a - b) for x, y in zip(u1, u2a) for a, b in zip(x["weights"], y["weights"]))
    return {
        "case": name,
        "updates": len(u1),
        "ranks_identical": u2a == u2b and two["params_in_sync"],
        "max_weight_diff": dw,
        "max_param_diff": float((p1 - p2).abs().max()),
        "max_param_abs": float(p1.abs().max()),
    }


def timing_config(tmp: Path, steps: int) -> dict:
    """DynamixSFT on the built-in base model and three built-in domains."""
    return {
        "seed": 0,
        "max_steps": steps,
        "progress": False,
        "output_dir": str(tmp / "t"),
        "model": {"name_or_path": "builtin"},
        "datasets": [
            {"name": n, "path": f"builtin:{n}", "max_examples": 400}
            for n in ("arithmetic", "code", "dialogue")
        ],
        "evals": [
            {
                "name": "arithmetic",
                "path": "builtin:arithmetic",
                "split": "eval",
                "batches": 2,
                "batch_size": 8,
                "accuracy": False,
            }
        ],
        "mixer": {"name": "dynamixsft", "update_every": 10},
        "train": {
            "batch_size": 16,
            "lr": 5e-4,
            "max_length": 128,
            "eval_every": steps,
            "log_every": 10,
            "save_every": 0,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 cases, 1 repeat, 20 timing steps")
    ap.add_argument("--cases", nargs="*", help=f"subset of {list(CASES)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60, help="timing run length")
    ap.add_argument("--out", default=str(ROOT / "bench/results/distributed.json"))
    a = ap.parse_args()
    cases = a.cases or (["dynamixsft", "dynamics", "exp3"] if a.quick else list(CASES))
    repeats, steps = (1, 20) if a.quick else (a.repeats, a.steps)

    tmp = Path(tempfile.mkdtemp(prefix="mixtune-dist-"))
    data_dir = tmp / "data"
    data_dir.mkdir()
    conftest.write_jsonl(data_dir / "add.jsonl", conftest.addition_records(200))
    conftest.write_jsonl(data_dir / "rev.jsonl", conftest.reverse_records(120))
    rows = []
    for name in cases:
        rows.append(agreement(name, tmp, data_dir))
        print(json.dumps(rows[-1]), flush=True)

    raw = timing_config(tmp, steps)
    times: dict[str, list] = {"1p x 1t": [], "1p x 2t": [], "2p x 1t": []}
    for r in range(repeats):  # interleaved: the machine is shared and noisy
        for label, procs, threads in (("1p x 1t", 1, 1), ("1p x 2t", 1, 2), ("2p x 1t", 2, 1)):
            res, _, wall = run_worker(raw, tmp / f"time-{label[0]}{label[5]}-{r}", procs, threads)
            times[label].append({"wall": wall, "train": max(res["seconds"])})
            print(label, times[label][-1], flush=True)
    med = {
        k: {m: statistics.median(x[m] for x in v) for m in ("wall", "train")}
        for k, v in times.items()
    }
    out = {
        "agreement": rows,
        "timing": {"steps": steps, "repeats": repeats, "runs": times, "median": med},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))

    print("\n| case | updates | ranks identical | max weight diff | max param diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['updates']} | {r['ranks_identical']} | "
            f"{r['max_weight_diff']:.2e} | {r['max_param_diff']:.2e} |"
        )
    print(f"\ntiming ({steps} steps, median of {repeats}):")
    for k, v in med.items():
        print(f"  {k}: train loop {v['train']:.1f} s, process wall {v['wall']:.1f} s")
    base = med["1p x 1t"]["train"]
    for k in ("1p x 2t", "2p x 1t"):
        print(f"  {k} / 1p x 1t (train loop): {med[k]['train'] / base:.2f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
