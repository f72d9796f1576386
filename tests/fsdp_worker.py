"""Probes, look-aheads and checkpoints on FSDP2 shards (torch's ``fully_shard``, CPU, gloo).

    torchrun --standalone --nproc_per_node 2 fsdp_worker.py CFG.json OUT.json

The Trainer shards its model with ``train.fsdp`` (``fully_shard`` of every decoder layer and
the root, the optimizer's groups pointed at the DTensor parameters), then mixtune's own
``engine.probe`` functions run on it. Two trainers of the same config train side
by side; one of them also runs a DynaMiCS probe, SGD and Adam look-aheads and the per-example
losses between its steps. Then a checkpoint of the shards is loaded by a third sharded trainer,
which must train on bit for bit like the original. Rank 0 writes what it found to OUT.json.
"""

import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from helpers import leave_distributed
from mixtune import config
from mixtune.engine import build, checkpoint, probe
from mixtune.engine.loop import Trainer


def make_trainer(raw: dict) -> Trainer:
    """A Trainer whose model is sharded with FSDP2 (``train.fsdp``: engine.process.shard_fsdp2)."""
    return Trainer(config.load(data={**raw, "train": {**raw["train"], "fsdp": True}}))


def train(t: Trainer, n: int) -> None:
    for _ in range(n):
        t.train_step(*t.sampler.next_batch(t.cfg.train.batch_size))
        t.step += 1


def full_state(t: Trainer) -> dict:
    """Everything a probe must leave untouched, gathered to full tensors (a collective)."""

    def full(x):
        return x.full_tensor() if isinstance(x, DTensor) else x

    opt = probe.unwrap_optimizer(t.optimizer)
    return {
        "params": [full(p.detach()).clone() for p in t.params],
        "opt": [
            {
                k: full(v).clone() if torch.is_tensor(v) else v
                for k, v in sorted(opt.state[p].items())
            }
            for p in t.params
        ],
        "lr": [g["lr"] for g in opt.param_groups],
        "sched": t.scheduler.state_dict(),
        "sampler": copy.deepcopy(t.sampler.state_dict()),
        "torch_rng": torch.get_rng_state(),
    }


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


def _save(t: Trainer) -> Path:
    return checkpoint.save(
        t.rundir.checkpoints,
        t.step,
        accelerator=t.acc,
        model=t.model,
        optimizer=t.optimizer,
        scheduler=t.scheduler,
        sampler=t.sampler,
        mixer=t.mixer,
        loss=t.loss_fn,
        keep=2,
        state={},
        rank_state={},
    )


def checkpoint_round_trip(x: Trainer, y: Trainer, raw: dict) -> dict:
    """x saves a checkpoint of its shards; a fresh sharded trainer z loads it; x and z train on
    side by side and must stay bit-identical. Also the final model directory (gathered)."""
    path = _save(x)
    z = make_trainer({**raw, "output_dir": raw["output_dir"] + "_resumed"})
    state, _ = checkpoint.load(
        path,
        accelerator=z.acc,
        model=z.model,
        optimizer=z.optimizer,
        scheduler=z.scheduler,
        sampler=z.sampler,
        mixer=z.mixer,
        loss=z.loss_fn,
    )
    z.step = state["step"]
    loaded_same = same(full_state(z)["params"], full_state(x)["params"])
    for t in (x, z):
        train(t, 2)
    a, b = full_state(x), full_state(z)
    a.pop("torch_rng"), b.pop("torch_rng")  # z's RNG was set from the checkpoint: same too
    resumed_same = same(a, b)
    files = sorted(p.name for p in path.iterdir())
    final = Path(raw["output_dir"]) / "final"
    full = checkpoint.full_state_dict(x.acc.unwrap_model(x.model))
    if x.rank == 0:
        build.save_final(x.acc.unwrap_model(x.model), x.tokenizer, final, full)
    x.acc.wait_for_everyone()
    saved = load_file(str(final / "model.safetensors"))
    final_same = all(
        torch.equal(saved[n], p.full_tensor())
        for n, p in x.acc.unwrap_model(x.model).named_parameters()
        if n in saved
    )
    # An unsharded (DDP) checkpoint resumes sharded: its full moments are split on load.
    w = Trainer(config.load(data={**raw, "output_dir": raw["output_dir"] + "_ddp"}))
    train(w, 2)
    path = _save(w)
    v = make_trainer({**raw, "output_dir": raw["output_dir"] + "_from_ddp"})
    checkpoint.load(
        path,
        accelerator=v.acc,
        model=v.model,
        optimizer=v.optimizer,
        scheduler=v.scheduler,
        sampler=v.sampler,
        mixer=v.mixer,
        loss=v.loss_fn,
    )
    for t in (w, v):
        train(t, 2)
    ddp_diff = max(
        float((a - b).abs().max())
        for a, b in zip(full_state(v)["params"], [p.detach() for p in w.params])
    )
    return {
        "checkpoint_files": files,
        "loaded_same": loaded_same,
        "resumed_same": resumed_same,
        "final_same": final_same,
        "final_tensors": len(saved),
        "from_ddp_max_diff": ddp_diff,
    }


def main(cfg_path: str, out_path: str) -> None:
    raw = json.load(open(cfg_path))
    x, y = make_trainer(raw), make_trainer({**raw, "output_dir": raw["output_dir"] + "_twin"})
    out = {
        "world": x.world,
        "sharded": all(isinstance(p, DTensor) for p in x.params),
        "local_fraction": sum(p.to_local().numel() for p in x.params)
        / sum(p.numel() for p in x.params),
    }
    snap = probe.Snapshot(x.state)
    out["snapshot_fraction"] = sum(s.to_local().numel() for s in snap.params) / sum(
        p.numel() for p in x.params
    )
    del snap
    for t in (x, y):
        train(t, 2)
    before = full_state(x)
    now = x.evaluate(2, accuracy=False, use_cache=False)
    probed = probe.probe(x.state, 0, 2, n_batches=2)
    out["probe_moved"] = {d: probed[d]["loss"] - now[d]["loss"] for d in now}
    out["after_probe_same"] = same(full_state(x), before)
    la = {
        opt: probe.lookahead(x.state, j, opt, batch_size=4) for j, opt in ((1, "sgd"), (0, "adam"))
    }
    out["lookahead_moved"] = {k: float((r.pre - r.post).mean()) for k, r in la.items()}
    losses = probe.example_losses(x.state, 1, batch_size=4)
    out["example_losses_equal_pre"] = bool(
        torch.allclose(torch.as_tensor(losses), torch.as_tensor(la["sgd"].pre), atol=1e-6)
    )
    out["after_lookahead_same"] = same(full_state(x), before)
    # ... and training goes on exactly as if nothing had happened.
    out["eval_same"] = x.evaluate(2, accuracy=False, use_cache=False) == y.evaluate(
        2, accuracy=False, use_cache=False
    )
    for t in (x, y):
        train(t, 3)
    out["continued_same"] = same(full_state(x), full_state(y))
    out["eval_after_same"] = x.evaluate(2, accuracy=False, use_cache=False) == y.evaluate(
        2, accuracy=False, use_cache=False
    )
    out.update(checkpoint_round_trip(x, y, raw))
    if x.rank == 0:
        with open(out_path, "w") as f:
            json.dump(out, f)
    leave_distributed()  # helpers.leave_distributed: why not a plain exit


if __name__ == "__main__":
    main(*sys.argv[1:3])
