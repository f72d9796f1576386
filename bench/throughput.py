"""Training throughput: mixtune vs transformers.Trainer vs TRL SFTTrainer doing the same work.

    python bench/throughput.py                 # 5 repetitions x 3 systems, 40 steps each
    python bench/throughput.py --quick         # smoke test: 1 repetition, 8 steps
    python bench/throughput.py --threads 2 --reps 7 --json out.json
    python bench/throughput.py --fixed-length 128 --systems mixtune,hf --reps 3

Identical in all three: the initial weights (one tiny Llama, hidden 128, 4 layers, 4 heads,
intermediate 512, random init, saved once and loaded with ``from_pretrained``), the tokenizer
(mixtune's built-in 4096-token BPE), the examples *and their order* (the batches mixtune's
sampler draws for a proportional mixture of built-in arithmetic / code / dialogue; HF and TRL
read them in that order with ``train_sampling_strategy="sequential"``), the token sequences
(prompt masked with -100; checked element by element in every worker), right padding to the
longest sequence of the batch, batch size, fp32 on CPU, AdamW (torch, non-fused, lr, betas,
eps, no weight decay), constant LR, clipping at 1.0, the number of optimizer steps. Evaluation,
checkpointing and logging are off (mixtune: ``evals: []``, ``log_every`` = steps, checkpoint
only after the last step; HF/TRL: strategies ``no``), and fall outside the timed window anyway.

Tokens/s = non-pad input tokens of the timed steps / wall time of those steps. The clock is
read at the end of every optimizer step (mixtune: after ``Trainer._count``; HF/TRL:
``on_step_end``, after ``optimizer.step`` and ``zero_grad``); the timed window runs from the
end of the last warm-up step to the end of the last step, so it includes fetching and
collating the batches, forward, backward, clipping, the optimizer and each library's per-step
bookkeeping, and excludes imports, data loading/tokenisation, model construction and the final
save. Each worker is a fresh process; systems alternate A B C A B C ... Also reported:
tokens per second of CPU time (``time.process_time`` over the same window), which a busy
shared machine disturbs much less than wall time.

``--fixed-length N``: every example exactly N tokens, so there is no padding for any system to
waste or remove and the comparison is of the training step alone. Only records whose whole
conversation has at least N tokens and whose prompt leaves at least 2 response tokens are kept
(datasets left with too few are dropped), and max_length is N: every system cuts each example
to the same N tokens (checked as above).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, median, pin_threads, run_worker, table  # noqa: E402

SYSTEMS = ("mixtune", "hf", "trl")
EXTRA = ("mixtune-shift", "mixtune-packed", "mixtune-full", "trl-padfree")
"""Also selectable with ``--systems``: mixtune with train.packing=true, TRL with
padding_free=True (flattened rows with position_ids, its padding-free collator)."""
DATASETS = (("arithmetic", 2000), ("code", None), ("dialogue", None))
MODEL = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}


# ---------------------------------------------------------------------------------------------
# Preparation (parent): data files, expected token sequences, initial weights, batch order
def tokenise(tok, prompt: str, response: str, max_length: int) -> tuple[list, list]:
    """Prompt tokens (label -100) + response tokens, each part tokenised on its own."""
    user = [{"role": "user", "content": prompt}]
    prefix = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(
        user + [{"role": "assistant", "content": response}], tokenize=False
    )
    assert full.startswith(prefix)
    p = tok(prefix, add_special_tokens=False)["input_ids"]
    c = tok(full[len(prefix) :], add_special_tokens=False)["input_ids"]
    return (p + c)[:max_length], ([-100] * len(p) + c)[:max_length]


def prepare(
    work: Path,
    steps: int,
    batch: int,
    lr: float,
    max_length: int,
    warmup: int,
    fixed: int | None = None,
) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mixtune.builtin import base_model_path, load_domain
    from mixtune.data.sampler import MixtureSampler

    tok = AutoTokenizer.from_pretrained(str(base_model_path()))
    names, sizes, tokens, records = [], [], {}, {}
    if fixed is not None:
        max_length = fixed
    for name, n in DATASETS:
        recs = [
            {"prompt": r["prompt"], "response": r["response"]}
            for r in load_domain(name, "train", n=n, seed=0)
        ]
        if fixed is not None:  # exactly `fixed` tokens each after the cut, >= 2 supervised
            full = [tokenise(tok, r["prompt"], r["response"], 10**9) for r in recs]
            recs = [
                r
                for r, (ids, labels) in zip(recs, full)
                if len(ids) >= fixed and sum(x != -100 for x in labels[:fixed]) >= 2
            ]
            if len(recs) < batch:
                print(f"--fixed-length {fixed}: {name} has {len(recs)} such records; left out")
                continue
        with open(work / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
        # mixtune indexes a dataset's examples through a seeded permutation of the file: use
        # the same indices here (the mixtune worker checks every example against these)
        perm = np.random.default_rng([0, zlib.crc32(name.encode())]).permutation(len(recs))
        recs = [recs[i] for i in perm]
        names.append(name)
        sizes.append(len(recs))
        tokens[name] = [tokenise(tok, r["prompt"], r["response"], max_length) for r in recs]
        records[name] = recs
    cfg = LlamaConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        **MODEL,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    # The batches mixtune's sampler draws for the proportional mixture (seed 0).
    sampler = MixtureSampler(sizes, names, np.asarray(sizes) / sum(sizes), seed=0)
    order = [[(int(k), int(e)) for k, e in zip(*sampler.next_batch(batch))] for _ in range(steps)]
    step_tokens = [sum(len(tokens[names[k]][e][0]) for k, e in b) for b in order]
    meta = {
        "names": names,
        "sizes": sizes,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "max_length": max_length,
        "warmup": warmup,
        "order": order,
        "step_tokens": step_tokens,
        "pad_id": tok.pad_token_id,
        "fixed": fixed,
    }
    (work / "meta.json").write_text(json.dumps(meta))
    (work / "tokens.json").write_text(json.dumps(tokens))
    (work / "records.json").write_text(json.dumps(records))


# ---------------------------------------------------------------------------------------------
# Workers (one fresh process per measurement)
def ordered(meta, table_: dict) -> list:
    """Items of ``table_[name][e]`` in the global batch order."""
    return [table_[meta["names"][k]][e] for batch in meta["order"] for k, e in batch]


def final_loss(model, meta, tokens) -> float:
    """Token-mean loss of the trained model on the first batch (a same-work check)."""
    import torch

    from mixtune.data.collate import collate
    from mixtune.losses.core import token_losses

    ex = [tokens[meta["names"][k]][e] for k, e in meta["order"][0]]
    b = collate([np.array(i) for i, _ in ex], [np.array(lab) for _, lab in ex], meta["pad_id"])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        nll, mask = token_losses(logits, b["labels"])
    return float(nll.sum() / mask.sum())


def run_mixtune(
    work: Path, meta: dict, tokens: dict, marks: list, seen: list, packing=False, logits="auto"
):
    from mixtune import config
    from mixtune.engine.loop import Trainer

    class Timed(Trainer):
        def _count(self, ds, ex, stats):
            super()._count(ds, ex, stats)
            marks.append((time.perf_counter(), time.process_time()))
            seen.append(self.counters["input_tokens"])
            self.bench_draws.append((ds, ex))

    out = Path(tempfile.mkdtemp(prefix="run-mixtune-", dir=work))
    raw = {
        "output_dir": str(out),
        "seed": 0,
        "max_steps": meta["steps"],
        "resume": "never",
        "progress": False,
        "model": {"name_or_path": str(work / "model"), "dtype": "float32"},
        "datasets": [{"name": n, "path": str(work / f"{n}.jsonl")} for n in meta["names"]],
        "evals": [],
        "mixer": {"name": "proportional"},
        "loss": {"name": "sft"},
        "train": {
            "batch_size": meta["batch"],
            "micro_batch_size": meta["batch"],
            "lr": meta["lr"],
            "schedule": "constant",
            "max_grad_norm": 1.0,
            "max_length": meta["max_length"],
            "eval_every": 0,
            "log_every": meta["steps"],
            "save_every": 0,
            "packing": packing,
            "logits": logits,
        },
    }
    trainer = Timed(config.from_dict(raw))
    trainer.bench_draws = []
    for t in trainer.train_sets:
        want = tokens[t.name]
        assert len(want) == t.size and all(
            list(a) == w[0] and list(b) == w[1]
            for a, b, w in zip(t.data.input_ids, t.data.labels, want)
        ), "token mismatch"
    trainer.run()
    got = [[(int(k), int(e)) for k, e in zip(ds, ex)] for ds, ex in trainer.bench_draws]
    assert got == [[tuple(x) for x in b] for b in meta["order"]], "batch order mismatch"
    seen[:] = np.diff([0] + seen).tolist()  # cumulative -> per step
    return trainer.acc.unwrap_model(trainer.model)


def shifted_label_token_losses(logits, labels):
    """Experimental ``token_losses`` (``--systems mixtune-shift``): same values, no logits copy.

    Shifts the labels (padded with IGNORE at the end) instead of slicing the logits, so the
    (B, T, V) logits reach cross-entropy as a view; the last position is dropped afterwards.
    """
    import torch.nn.functional as F

    from mixtune.losses.core import IGNORE

    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(target.shape)
    return nll[:, :-1].contiguous(), target[:, :-1] != IGNORE


def run_mixtune_shift(work: Path, meta: dict, tokens: dict, marks: list, seen: list):
    import mixtune.losses.core

    mixtune.losses.core.token_losses = shifted_label_token_losses
    return run_mixtune(work, meta, tokens, marks, seen)


def _hf_args(cls, work: Path, meta: dict, **extra):
    return cls(
        output_dir=str(work / "hf-out"),
        max_steps=meta["steps"],
        per_device_train_batch_size=meta["batch"],
        gradient_accumulation_steps=1,
        learning_rate=meta["lr"],
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        seed=0,
        **extra,
    )


def _callbacks(marks: list):
    from transformers import TrainerCallback

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), time.process_time()))

    return [Marks()]


def _count_collator(collate, seen: list):
    def wrapped(features):
        batch = collate(features)
        mask = batch.get("attention_mask")  # none in a padding-free batch: no pad tokens
        seen.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    return wrapped


def run_hf(work: Path, meta: dict, tokens: dict, marks: list, seen: list):
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    rows = ordered(meta, tokens)
    data = Dataset.from_dict(
        {
            "input_ids": [r[0] for r in rows],
            "labels": [r[1] for r in rows],
            "attention_mask": [[1] * len(r[0]) for r in rows],
        }
    )
    collator = DataCollatorForSeq2Seq(
        tok, padding="longest", label_pad_token_id=-100, return_tensors="pt"
    )
    trainer = Trainer(
        model=model,
        args=_hf_args(TrainingArguments, work, meta),
        train_dataset=data,
        data_collator=_count_collator(collator, seen),
        callbacks=_callbacks(marks),
    )
    trainer.train()
    return trainer.model


def run_trl(work: Path, meta: dict, tokens: dict, marks: list, seen: list, padding_free=False):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    recs = ordered(meta, json.loads((work / "records.json").read_text()))
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["response"]}],
            }
            for r in recs
        ]
    )
    args = _hf_args(
        SFTConfig,
        work,
        meta,
        # The examples are already cut to max_length (checked below); TRL does not enforce it
        # padding-free without packing, and refuses a max_length then.
        max_length=None if padding_free else meta["max_length"],
        packing=False,
        padding_free=padding_free,
        completion_only_loss=True,
        gradient_checkpointing=False,
        shuffle_dataset=False,
        loss_type="nll",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        callbacks=_callbacks(marks),
    )
    want = ordered(meta, tokens)
    prepared = trainer.train_dataset
    assert prepared["input_ids"] == [w[0] for w in want], "TRL tokenised differently"
    assert prepared["labels"] == [w[1] for w in want], "TRL masked differently"
    trainer.data_collator = _count_collator(trainer.data_collator, seen)
    trainer.train()
    return trainer.model


def worker(system: str, work: Path, threads: int) -> dict:
    pin_threads(threads)
    meta = json.loads((work / "meta.json").read_text())
    tokens = json.loads((work / "tokens.json").read_text())
    marks: list[float] = []
    seen: list[int] = []
    model = {
        "mixtune": run_mixtune,
        "hf": run_hf,
        "trl": run_trl,
        "mixtune-shift": run_mixtune_shift,
        "mixtune-packed": lambda *a: run_mixtune(*a, packing=True),
        "mixtune-full": lambda *a: run_mixtune(*a, logits="full"),
        "trl-padfree": lambda *a: run_trl(*a, padding_free=True),
    }[system](work, meta, tokens, marks, seen)
    n, w = meta["steps"], meta["warmup"]
    assert len(marks) == n, f"{system}: {len(marks)} step marks for {n} steps"
    assert seen == meta["step_tokens"], f"{system}: per-step non-pad tokens differ"
    if meta.get("fixed"):
        assert set(meta["step_tokens"]) == {meta["fixed"] * meta["batch"]}, "lengths not fixed"
    tok = sum(meta["step_tokens"][w:])
    wall, cpu = np.array(marks)[w - 1 :].T
    secs, cpu_secs = wall[-1] - wall[0], cpu[-1] - cpu[0]
    return {
        "system": system,
        "tokens": tok,
        "seconds": secs,
        "tokens_per_s": tok / secs,
        "cpu_seconds": cpu_secs,
        "tokens_per_cpu_s": tok / cpu_secs,
        "step_s_median": float(np.median(np.diff(wall))),
        "threads": threads,
        "final_loss": final_loss(model, meta, tokens),
    }


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition, 8 steps")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument(
        "--fixed-length",
        type=int,
        default=None,
        help="every example exactly this many tokens (<= 256): no padding for anyone",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated; also mixtune-shift (mixtune with an experimental "
        "token_losses that shifts labels instead of slicing logits), mixtune-packed "
        "(train.packing=true), mixtune-full (train.logits=full: every position's logits, as "
        "before the supervised-positions default), trl-padfree (SFTConfig padding_free=True)",
    )
    ap.add_argument("--json", help="write all measurements here")
    ap.add_argument("--worker", choices=SYSTEMS + EXTRA, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, Path(a.work), a.threads)))
        return
    if a.quick:
        a.reps, a.steps, a.warmup = 1, 8, 2
    systems = a.systems.split(",")
    work = Path(tempfile.mkdtemp(prefix="mixtune-bench-"))
    print(f"work dir {work}; load before: {loadavg()}", flush=True)
    prepare(work, a.steps, a.batch_size, a.lr, a.max_length, a.warmup, a.fixed_length)
    meta = json.loads((work / "meta.json").read_text())
    if a.fixed_length:
        print(f"fixed length {a.fixed_length}: datasets {dict(zip(meta['names'], meta['sizes']))}")
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for rep in range(a.reps):
        for s in systems:
            argv_ = [__file__, "--worker", s, "--work", str(work), "--threads", str(a.threads)]
            r = run_worker(argv_, a.threads, work / "workers.log")
            results[s].append(r)
            print(
                f"rep {rep + 1}/{a.reps} {s:8s} {r['tokens_per_s']:10.0f} tok/s "
                f"({r['tokens']} tokens in {r['seconds']:.2f} s; final loss "
                f"{r['final_loss']:.5f}) load {loadavg()}",
                flush=True,
            )
    print(f"load after: {loadavg()}")
    med = {s: median(r["tokens_per_s"] for r in results[s]) for s in systems}
    cpu = {s: median(r["tokens_per_cpu_s"] for r in results[s]) for s in systems}
    rows = [
        [
            s,
            med[s],
            min(r["tokens_per_s"] for r in results[s]),
            max(r["tokens_per_s"] for r in results[s]),
            cpu[s],
            median(r["step_s_median"] for r in results[s]) * 1000,
            f"{median(r['final_loss'] for r in results[s]):.5f}",
        ]
        for s in systems
    ]
    print(
        table(
            [
                "system",
                "median tok/s (wall)",
                "min",
                "max",
                "median tok/s (CPU time)",
                "median step ms",
                "final loss",
            ],
            rows,
        )
    )
    for ours in (s for s in ("mixtune", "mixtune-packed") if s in systems):
        for other in (s for s in systems if not s.startswith("mixtune")):
            paired = median(
                m["tokens_per_s"] / o["tokens_per_s"] for m, o in zip(results[ours], results[other])
            )
            print(
                f"{ours}/{other}: wall: ratio of medians {med[ours] / med[other]:.3f}, "
                f"median of paired ratios {paired:.3f}; CPU time: ratio of medians "
                f"{cpu[ours] / cpu[other]:.3f}"
            )
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))


if __name__ == "__main__":
    main()
