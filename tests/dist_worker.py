"""Run under torchrun with 2 processes: train, then report what each rank saw and holds."""

import json
import sys
from collections import Counter

import torch
import torch.distributed as dist

from helpers import ChaseLoss
from mixtune import config
from mixtune.engine import loop
from mixtune.mixers import MIXERS

MIXERS["chase"] = ChaseLoss


def main(cfg_path: str, out_path: str) -> None:
    raw = json.load(open(cfg_path))
    trainer = loop.Trainer(config.load(data=raw))
    processed, batches = [], []
    real_collate, real_step = loop.collate, trainer.train_step

    def spy_collate(ids, labels, pad_id, domain=None):
        processed.extend((int(d), tuple(int(t) for t in x)) for d, x in zip(domain, ids))
        return real_collate(ids, labels, pad_id, domain)

    def spy_step(ds, ex):
        data = trainer.train_sets
        batches.extend((int(k), tuple(int(t) for t in data[k].data.input_ids[e]))
                       for k, e in zip(ds, ex))
        return real_step(ds, ex)

    loop.collate = spy_collate
    trainer.train_step = spy_step
    trainer.run()
    flat = torch.cat([p.detach().flatten() for p in trainer.params])
    mine = {"weights": trainer.sampler.weights.tolist(), "processed": processed,
            "batches": batches, "world": trainer.world}
    gathered = [None, None]
    dist.all_gather_object(gathered, mine)
    params = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(params, flat)
    if trainer.rank == 0:
        cover = Counter(map(tuple, gathered[0]["processed"])) + Counter(
            map(tuple, gathered[1]["processed"]))
        result = {
            "world": [g["world"] for g in gathered],
            "weights": [g["weights"] for g in gathered],
            "same_global_batches": gathered[0]["batches"] == gathered[1]["batches"],
            "shards_cover_batches": cover == Counter(map(tuple, gathered[0]["batches"])),
            "shards_nonempty": all(len(g["processed"]) > 0 for g in gathered),
            "params_in_sync": bool(torch.equal(params[0], params[1])),
        }
        json.dump(result, open(out_path, "w"))
        torch.save(flat, out_path + ".params.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
