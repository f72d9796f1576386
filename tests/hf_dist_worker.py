"""HF ``Trainer`` (or TRL ``SFTTrainer``) + MixtureDataset + MixtureCallback, one rank's view.

    torchrun --standalone --nproc_per_node 2 hf_dist_worker.py SPEC.json OUT.json
    python hf_dist_worker.py SPEC.json OUT.json      # the 1-process reference

SPEC: {"mixer": name, "options": {...}, "steps": n, "micro": per-device batch, "ga": n,
"trl": bool, "dir": scratch directory}. Each rank records the rows of every training forward
(with the optimizer step they belong to) and the mixture records; rank 0 gathers them with the
final parameters of every rank into OUT.json.
"""

import json
import sys

import torch
import torch.distributed as dist
import transformers

from helpers import leave_distributed
from test_hf_integration import MixtureCallback, MixtureDataset, tiny_model, toy_data


class Rows(transformers.TrainerCallback):
    """The token ids of every row of every training forward, by optimizer step."""

    def __init__(self):
        self.rows, self.step = [], 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, a, kw, out):
            if module.training and torch.is_grad_enabled():
                self.rows += [[self.step, r.tolist()] for r in kw["input_ids"]]

        model.register_forward_hook(hook, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


def run(spec: dict) -> dict:
    transformers.logging.set_verbosity_error()
    mix = MixtureDataset(toy_data(), seed=0)
    cb = MixtureCallback(mix, spec["mixer"], spec.get("options"))
    rows = Rows()
    common = dict(
        output_dir=spec["dir"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=spec.get("ga", 1),
        learning_rate=3e-3,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    if spec.get("trl"):
        import trl

        from mixtune.data.bytetok import byte_tokenizer

        trainer = trl.SFTTrainer(
            model=tiny_model(),
            processing_class=byte_tokenizer(),
            callbacks=[cb, rows],
            args=trl.SFTConfig(**common, dataset_kwargs={"skip_prepare_dataset": True}),
            train_dataset=mix.as_hf_dataset(),
        )
    else:
        trainer = transformers.Trainer(
            tiny_model(),
            transformers.TrainingArguments(**common),
            train_dataset=mix,
            data_collator=mix.collate,
            callbacks=[cb, rows],
        )
    trainer.train()
    recs = [
        {k: v for k, v in r.items() if "seconds" not in k}
        for r in trainer.state.log_history
        if any(k.startswith("mixtune/") for k in r)
    ]
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return {
        "records": recs,
        "rows": rows.rows,
        "seen": cb.seen.tolist(),
        "params": params.tolist(),
        "world": trainer.args.world_size,
    }


def main(spec_path: str, out_path: str) -> None:
    mine = run(json.load(open(spec_path)))
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        rank = dist.get_rank()
    else:
        gathered, rank = [mine], 0
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    if dist.is_initialized():
        leave_distributed()  # helpers.leave_distributed: why not a plain exit


if __name__ == "__main__":
    main(*sys.argv[1:3])
