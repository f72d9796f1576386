"""fp16 (loss-scaled) training on 2 processes, or one, with an overflow forced on one rank.

    torchrun --standalone --nproc_per_node 2 fp16_worker.py CFG.json OUT.json
    python fp16_worker.py CFG.json OUT.json          # the 1-process reference

CFG.json is a run config plus an optional ``"_overflow"`` entry (removed before the config is
read): ``{"rank": r, "steps": [s, ...], "where": "shard" | "backward", "growth_interval": n}``.
At the optimizer steps ``steps`` (1-based), rank ``r`` only makes a gradient overflow to inf
while the loss stays finite, what a too-large loss scale does:

- ``shard``: one element of this rank's own gradient shard, after the gradients are reduced
  (under FSDP2 after the reduce-scatter, so no other rank sees it): the case where only one
  rank's inf check would fire.
- ``backward``: one element of the final norm's output gradient during the backward, before
  the gradients are reduced (DDP's all-reduce or FSDP2's reduce-scatter spreads it).

``growth_interval`` shortens the scaler's (2,000 clean steps) so a few steps also show the
scale growing back. Each rank records, per optimizer step, whether it stepped, skipped for an
overflow, its loss scale afterwards, the gradient norm and the mixture weights, plus the
dtypes the LM head produced and where the forced overflow fired;
rank 0 writes every rank's record and the final trainable parameters (flat, gathered from the
FSDP2 shards) to OUT.json and OUT.json.params.pt. The train losses are in the run's
metrics.jsonl.
"""

import json
import math
import sys

import torch
import torch.distributed as dist

from helpers import leave_distributed
from mixtune import config
from mixtune.engine import loop
from mixtune.engine.process import local


def _force_overflow(trainer: loop.Trainer, spec: dict) -> list[int]:
    """Install the forced overflow; returns the list of steps (1-based, the one about to run)
    at which it fired: a look-ahead between steps fires too (DynamixSFT's virtual step)."""
    steps, fired = set(spec["steps"]), []

    def due() -> bool:
        return trainer.rank == spec["rank"] and trainer.step + 1 in steps

    if spec["where"] == "shard":
        real_unscale = trainer.scaler.unscale_

        def unscale_(params):  # the step unscales the reduced gradients before the norm
            if due():
                # The first parameter with elements in this rank's shard: inf there only.
                g = next(local(p.grad) for p in params if local(p.grad).numel())
                g.view(-1)[0] = math.inf
                fired.append(trainer.step + 1)
            return real_unscale(params)

        trainer.scaler.unscale_ = unscale_
    else:
        base = trainer.acc.unwrap_model(trainer.model)
        norm = base.get_decoder().norm

        def poison(module, args, out):
            if due() and out.requires_grad:  # training forwards only (evals run no_grad)
                fired.append(trainer.step + 1)

                def grad_hook(g):
                    g = g.clone()
                    g.view(-1)[0] = math.inf
                    return g

                out.register_hook(grad_hook)

        norm.register_forward_hook(poison)
    return fired


def collect(raw: dict) -> tuple[dict, torch.Tensor, loop.Trainer]:
    """Train ``raw`` in this process (one rank of the run); returns what this rank saw."""
    raw = dict(raw)
    spec = raw.pop("_overflow", None)
    trainer = loop.Trainer(config.load(data=raw))
    assert trainer.scaler is not None, "train.mixed_precision=fp16 did not enable loss scaling"
    fired = []
    if spec is not None:
        if "growth_interval" in spec:
            trainer.scaler.growth_interval = spec["growth_interval"]
        fired = _force_overflow(trainer, spec)
    # float16 autocast really on (not fp32 under another name): the head's output dtypes
    seen = set()
    head = trainer.acc.unwrap_model(trainer.model).get_output_embeddings()
    head.register_forward_hook(lambda m, i, o: seen.add(str(o.dtype)))
    steps = []
    real_step = trainer.train_step

    def spy_step(ds, ex):
        stats = real_step(ds, ex)
        steps.append(
            {
                "step": trainer.step + 1,
                "overflow": stats.overflow,
                "skipped": stats.skipped,
                "loss_scale": trainer.scaler.scale,
                "grad_norm": float(stats.grad_norm),
                "weights": trainer.sampler.weights.tolist(),
            }
        )
        return stats

    trainer.train_step = spy_step
    trainer.run()
    flat = torch.cat(
        [
            (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten()
            for p in trainer.params
        ]
    )
    mine = {"steps": steps, "world": trainer.world, "head_dtypes": sorted(seen), "fired": fired}
    return mine, flat, trainer


def main(cfg_path: str, out_path: str) -> None:
    mine, flat, trainer = collect(json.load(open(cfg_path)))
    world = trainer.world
    gathered, params = [mine], [flat]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        params = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(params, flat)
    if trainer.rank == 0:
        result = {
            "ranks": gathered,
            "params_in_sync": all(bool(torch.equal(p, params[0])) for p in params),
        }
        json.dump(result, open(out_path, "w"))
        torch.save(flat, out_path + ".params.pt")
    if world > 1:
        leave_distributed()  # helpers.leave_distributed: why not a plain exit


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
