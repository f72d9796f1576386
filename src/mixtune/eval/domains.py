"""Per-domain evaluation on fixed batches.

Loss is the token-mean NLL over the domain's first ``n_batches`` fixed batches. Accuracy is
greedy generation from the prompt, compared with the reference answer after
:func:`normalize_answer` (exact match). Batches are spread over ranks (batch b on rank
b mod world) and the sums are all-reduced, so every rank gets the same numbers.
"""

from __future__ import annotations

import re
import string

import torch

from mixtune.data.collate import collate, collate_prompts
from mixtune.data.domains import EvalDomain
from mixtune.losses import token_losses

try:  # FSDP2 (torch >= 2.6)
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover
    FSDPModule = None

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]+$")


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, drop trailing punctuation."""
    text = " ".join(text.lower().split())
    return _PUNCT.sub("", text).strip()


@torch.no_grad()
def evaluate(model, accelerator, domains: list[EvalDomain], tokenizer,
             n_batches: int | None = None, accuracy: bool = True) -> dict[str, dict[str, float]]:
    """``{domain: {"loss": float, "accuracy": float}}`` (accuracy only where answers exist)."""
    pad_id = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    # FSDP2: every forward is a collective, so every rank runs as many forwards (a rank with no
    # batch left repeats batch 0 and discards it) and generation runs with synced_gpus.
    sharded = FSDPModule is not None and isinstance(model, FSDPModule)
    # sums[d] = [nll sum, tokens, correct, answered] for domain d, reduced once at the end
    sums = torch.zeros(len(domains), 4, dtype=torch.float64, device=device)
    for d, dom in enumerate(domains):
        nb = dom.n_batches if n_batches is None else min(n_batches, dom.n_batches)
        end = -(-nb // world) * world if sharded else nb
        for b in range(rank, end, world):
            keep = b < nb
            lo, hi = (b * dom.batch_size, min((b + 1) * dom.batch_size, len(dom.data))) \
                if keep else (0, min(dom.batch_size, len(dom.data)))
            batch = collate(dom.data.input_ids[lo:hi], dom.data.labels[lo:hi], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            nll, mask = token_losses(logits, batch["labels"])
            if accuracy and dom.accuracy:
                correct = _generate_and_score(accelerator.unwrap_model(model), tokenizer, dom,
                                              lo, hi, device, synced=sharded)
            if not keep:
                continue
            sums[d, 0] += (nll * mask).sum().double()
            sums[d, 1] += mask.sum()
            if accuracy and dom.accuracy:
                sums[d, 2] += correct
                sums[d, 3] += hi - lo
    if world > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    if was_training:
        model.train()
    out = {}
    for d, dom in enumerate(domains):
        res = {"loss": float(sums[d, 0] / sums[d, 1].clamp(min=1))}
        if accuracy and dom.accuracy:
            res["accuracy"] = float(sums[d, 2] / sums[d, 3].clamp(min=1))
        out[dom.name] = res
    return out


def _generate_and_score(model, tokenizer, dom: EvalDomain, lo: int, hi: int, device,
                        synced: bool = False) -> int:
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = [dom.data.input_ids[i][: dom.data.prompt_len[i]] for i in range(lo, hi)]
    batch = {k: v.to(device) for k, v in collate_prompts(prompts, pad_id).items()}
    gen = model.generate(**batch, max_new_tokens=dom.max_new_tokens, do_sample=False,
                         pad_token_id=pad_id, eos_token_id=eos_id,
                         **({"synced_gpus": True} if synced else {}))
    new = gen[:, batch["input_ids"].shape[1]:].tolist()  # host sync: decoding needs the ids
    correct = 0
    for i, ids in zip(range(lo, hi), new):
        if eos_id in ids:
            ids = ids[: ids.index(eos_id)]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        correct += int(normalize_answer(text) == normalize_answer(dom.data.answers[i] or ""))
    return correct

