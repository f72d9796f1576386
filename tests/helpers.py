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
