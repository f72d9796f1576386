"""Helpers shared by the benchmark scripts: thread pinning, machine load, medians, tables."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def pin_threads(n: int) -> None:
    """Use exactly ``n`` intra-op threads (and one inter-op thread) in this process."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (inter-op pool started)
        pass


def thread_env(n: int) -> dict:
    """Environment for a child process pinned to ``n`` threads."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(n)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def loadavg() -> str:
    """The 1/5/15-minute load averages, as ``/proc/loadavg`` prints them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def median(xs) -> float:
    return float(statistics.median(xs))


def table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats get 4 significant digits unless pre-formatted."""

    def fmt(x):
        if isinstance(x, float):
            return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def run_worker(argv: list[str], threads: int, log_path: Path) -> dict:
    """Run ``python argv...`` pinned to ``threads``; return the JSON object on its last line."""
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=thread_env(threads)
    )
    with open(log_path, "a") as f:
        f.write(f"$ {' '.join(argv)}\n{proc.stderr}\n")
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise RuntimeError(f"worker {argv} failed (exit {proc.returncode}):\n{tail}")
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"worker {argv} printed no result; stdout:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])
