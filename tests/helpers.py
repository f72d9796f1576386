"""Test-only helpers shared by tests and the multi-process worker."""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _ChaseConfig:
    rate: float = 0.5


class ChaseLoss:
    """Test-only mixer: moves weight toward the dataset with the highest recent train loss.

    Its weights depend on the training history, so resume must restore that history exactly.
    """

    Config = _ChaseConfig

    def __init__(self, options, datasets, domains, seed):
        self.rate = options.rate
        self.calls = 0

    def update_steps(self, max_steps):
        return list(range(0, max_steps, 2))

    def propose(self, ctx):
        self.calls += 1
        losses = np.array([ctx.train_losses.get(d.name, 0.0) for d in ctx.datasets])
        target = np.eye(len(losses))[int(np.argmax(losses))]
        w = (1 - self.rate) * ctx.weights + self.rate * target
        ctx.log("calls", self.calls)
        return w / w.sum()

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def leave_distributed() -> None:
    """End a torchrun worker: leave together, tear the group down, exit without finalising.

    Why not a normal exit: gloo's worker threads release finished collectives asynchronously.
    A barrier's work object keeps the collective before it alive; when a worker thread drops
    it after the main thread has started interpreter shutdown, freeing that collective's
    Python-owned tensors needs the GIL, the thread is told to exit inside a C++ destructor, and
    the process aborts ("terminate called without an active exception": a core dump showed
    ``~AsyncBarrierWork -> ~AsyncAllgatherWork -> decref_pyobject -> take_gil ->
    pthread_exit`` while the main thread was in ``Py_FinalizeEx``). It hits workers whose last
    collective is an ``all_gather`` of Python tensors right before the end (about 1 run in 10
    here). Everything is written by now, so skipping finalisation loses nothing. ``mixtune``'s
    CLI ends a distributed rank the same way (``cli.main``).
    """
    import os
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torchrun(script, *args: str, timeout: float = 900):
    """``torchrun --standalone --nproc_per_node 2 SCRIPT ARGS`` on one thread per process, with
    the tests directory importable; returns the completed process (output captured)."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    here = Path(__file__).parent
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{here}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    # --standalone: the rendezvous binds a free port itself (no race on a guessed port)
    return subprocess.run(
        [
            shutil.which("torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            *map(str, args),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_llama(vocab: int = 100, tie: bool = True, seed: int = 0):
    """A 2-layer, 32-wide Llama with random weights (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            tie_word_embeddings=tie,
        )
    )


def numeric_leaves(tree: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics record, by dotted path (booleans and timings left out)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(numeric_leaves(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and "time" not in k:
            out[f"{prefix}{k}"] = float(v)
    return out


FP32_EPS = 2.0**-23
"""``torch.finfo(torch.float32).eps``: the relative spacing of float32 numbers (about 1.19e-7)."""


def fp32_tol(n_ops: float, scale: float = 1.0) -> dict:
    """``assert_close`` tolerances (``rtol``, ``atol``) for two float32 results of the same
    maths that round differently: another summation order (micro-batching, chunking, padding,
    sharding) or another kernel (a new torch or transformers version).

    Each rounding moves a value by at most one ``eps`` relative to its size; over ``n_ops``
    roundings that can add up (a sum of n terms, a chain of n steps) the worst case grows
    linearly, so ``|a - b| <= n_ops * eps * size``. ``scale`` is the size to use where the
    compared value itself may be near zero (``atol``): e.g. the most training can move a
    weight. A fixed ``atol=1e-6`` is not derived from anything and fails as soon as a library
    sums in another order (``test_dft_run_accumulation_exact_and_logged`` did, by 1.6e-6, with
    transformers 5.24). Not for exactness promises (resume, probes): those compare with
    ``rtol=0, atol=0`` or ``torch.equal``."""
    return {"rtol": n_ops * FP32_EPS, "atol": n_ops * FP32_EPS * scale}


ADAM_GROWTH = 2**13
"""``n_ops`` for weights after a few AdamW steps whose gradients were summed in another order.
Adam divides each gradient element by its running RMS, so an element summed with cancellation
carries a relative rounding error that no ``n * eps`` bounds, and it becomes part of an update
of about ``lr``. Measured on the tiny test models (3 steps, lr 3e-3, 1 or 2 vs 8 micro-batches):
at most about 1,500 ``eps * lr * steps`` (1.2e-6 here; 1.6e-6 in the issue's environment); 2**13
leaves a margin of about 5, while a wrong normaliser (per micro-batch instead of per step)
moves the weights by about 1e7 of these units (1.2e-2)."""


def adam_tol(lr: float, steps: int) -> dict:
    """Tolerances for weights after ``steps`` AdamW steps at ``lr`` whose gradients were summed
    in another order (gradient accumulation, sharding): :data:`ADAM_GROWTH` eps on the scale of
    what training moved (``lr * steps``), whatever the weight's size, plus one rounding of the
    weight itself per step (``rtol``)."""
    return {"rtol": steps * FP32_EPS, "atol": fp32_tol(ADAM_GROWTH, scale=lr * steps)["atol"]}


def tree_digest(path) -> str:
    """One SHA-256 of every name (files, directories, links) and every file's bytes under
    ``path``, lock file and temporary directories included: nothing excluded. Equal digests:
    the directory is byte-identical."""
    import hashlib
    from pathlib import Path

    path = Path(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode() + b"\0")
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()
