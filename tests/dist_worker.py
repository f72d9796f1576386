"""Run a training config under torchrun (or as one plain process) and report what each rank saw.

    torchrun --nproc_per_node 2 dist_worker.py CFG.json OUT.json
    python dist_worker.py CFG.json OUT.json          # the 1-process reference

Each rank records, at every mixer update, the weights it set and the mixer's diagnostics
(timings left out), plus every global batch it stepped on and the examples it processed. Rank 0
gathers everything and writes OUT.json; the final trainable parameters (flat) go to
OUT.json.params.pt.
"""

import json
import sys
from collections import Counter

import torch
import torch.distributed as dist

from helpers import ChaseLoss, leave_distributed
from mixtune import config
from mixtune.engine import loop, step
from mixtune.registry import MIXERS


def _clean(diag):
    """Mixer diagnostics without wall-clock timings (those legitimately differ per rank)."""
    if isinstance(diag, dict):
        return {k: _clean(v) for k, v in diag.items() if "seconds" not in k}
    return diag


def collect(raw: dict) -> tuple[dict, torch.Tensor, loop.Trainer]:
    """Train ``raw`` in this process (one rank of the run); returns what this rank saw."""
    trainer = loop.Trainer(config.load(data=raw))
    processed, batches, updates = [], [], []
    real_collate, real_step, real_update = step.collate, trainer.train_step, trainer._update_mixer
    real_pack = step.pack

    def spy_collate(ids, labels, pad_id, domain=None):
        if domain is not None:  # training micro-batches (probes' and evals' have no domain)
            processed.extend((int(d), tuple(int(t) for t in x)) for d, x in zip(domain, ids))
        return real_collate(ids, labels, pad_id, domain)

    def spy_pack(ids, labels, domain=None, *args):  # train.packing: training micro-batches
        processed.extend((int(d), tuple(int(t) for t in x)) for d, x in zip(domain, ids))
        return real_pack(ids, labels, domain, *args)

    def spy_step(ds, ex):
        data = trainer.train_sets
        batches.append(
            [(int(k), tuple(int(t) for t in data[k].data.input_ids[e])) for k, e in zip(ds, ex)]
        )
        return real_step(ds, ex)

    def spy_update():
        due = trainer.step in trainer.updates
        real_update()
        if due:
            updates.append(
                {
                    "step": trainer.step,
                    "weights": trainer.sampler.weights.tolist(),
                    "mixer": json.loads(
                        json.dumps(_clean(trainer.record.get("mixer")), default=float)
                    ),
                }
            )

    step.collate, step.pack = spy_collate, spy_pack
    trainer.train_step = spy_step
    trainer._update_mixer = spy_update
    try:
        summary = trainer.run()
    finally:
        step.collate, step.pack = real_collate, real_pack
    # (FSDP2 shards are gathered: every rank then holds the whole vector)
    flat = torch.cat(
        [
            (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten()
            for p in trainer.params
        ]
    )
    mine = {
        "updates": updates,
        "processed": processed,
        "batches": batches,
        "world": trainer.world,
        "seconds": summary["seconds"],
    }
    return mine, flat, trainer


def main(cfg_path: str, out_path: str) -> None:
    MIXERS["chase"] = ChaseLoss
    mine, flat, trainer = collect(json.load(open(cfg_path)))
    world = trainer.world
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, mine)
        params = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(params, flat)
    else:
        gathered, params = [mine], [flat]
    if trainer.rank == 0:
        _report(gathered, params, out_path, flat)
    if world > 1:
        leave_distributed()  # helpers.leave_distributed: why not a plain exit


def _report(
    gathered: list[dict], params: list[torch.Tensor], out_path: str, flat: torch.Tensor
) -> None:
    cover = sum((Counter(g["processed"]) for g in gathered), Counter())
    # Probe branches (DynaMiCS) also step: a branch's batches appear in every rank's list.
    stepped = Counter(x for b in gathered[0]["batches"] for x in b)
    result = {
        "world": [g["world"] for g in gathered],
        "updates": [g["updates"] for g in gathered],
        "seconds": [g["seconds"] for g in gathered],
        "same_global_batches": all(g["batches"] == gathered[0]["batches"] for g in gathered),
        "shards_cover_batches": cover == stepped,
        "shards_nonempty": all(len(g["processed"]) > 0 for g in gathered),
        "params_in_sync": all(bool(torch.equal(p, params[0])) for p in params),
    }
    json.dump(result, open(out_path, "w"))
    torch.save(flat, out_path + ".params.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
