"""Per-domain evaluation on fixed batches.

Loss is the token-mean NLL over the domain's first ``n_batches`` fixed batches, with its
standard error over examples (``loss_se``). :func:`evaluate_examples` keeps the per-example
numbers, so a subset of batches (a probe's budget) or a paired difference (before / after a
probe) can be computed later on exactly the same examples. Accuracy is
greedy generation from the prompt, compared with the reference answer after
:func:`normalize_answer` (exact match). Batches are spread over ranks (batch b on rank
b mod world) and the sums are all-reduced, so every rank gets the same numbers. With
``pack_rows`` (runs with ``train.packing``) a batch's examples are packed into rows without
padding (:func:`mixtune.data.collate.pack`) and each example's sums are gathered from its
segment: the padded computation's numbers up to float rounding, without the padding's compute.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import numpy as np
import torch

from mixtune.data.collate import collate, collate_prompts, example_sums, pack
from mixtune.data.domains import EvalDomain
from mixtune.losses.logits import token_nll

try:  # FSDP2 (torch >= 2.6)
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover
    FSDPModule = None

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]+$")


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, drop trailing punctuation."""
    text = " ".join(text.lower().split())
    return _PUNCT.sub("", text).strip()


@dataclass
class Scores:
    """Per-example results of one domain, in batch order (example i is in batch i // bs)."""

    nll: np.ndarray  # (n,) summed token NLL of each example's supervised tokens
    tokens: np.ndarray  # (n,) supervised tokens of each example
    correct: np.ndarray | None = None  # (n,) 1.0 / 0.0 exact match; None: not scored

    def head(self, n: int) -> Scores:
        """The first ``n`` examples."""
        return Scores(
            self.nll[:n], self.tokens[:n], None if self.correct is None else self.correct[:n]
        )

    def to_json(self) -> dict:
        return {
            "nll": self.nll.tolist(),
            "tokens": self.tokens.tolist(),
            "correct": None if self.correct is None else self.correct.tolist(),
        }

    @staticmethod
    def from_json(d: dict) -> Scores:
        return Scores(
            np.asarray(d["nll"], np.float64),
            np.asarray(d["tokens"], np.float64),
            None if d.get("correct") is None else np.asarray(d["correct"], np.float64),
        )


def loss_se(nll: np.ndarray, tokens: np.ndarray) -> float:
    """Standard error of the token-mean loss Σnll / Σtokens over examples (ratio estimator:
    examples are the sampling unit, so long and short examples weigh by their tokens)."""
    keep = tokens > 0
    n, total = int(keep.sum()), float(tokens.sum())
    if n < 2 or total <= 0:
        return float("nan")
    resid = nll[keep] - (nll.sum() / total) * tokens[keep]
    return float(np.sqrt(n / (n - 1) * (resid @ resid)) / total)


def mean_se(values: np.ndarray) -> float:
    """Standard error of a plain mean over examples (e.g. exact-match 0/1; NaN under 2)."""
    return float(values.std(ddof=1) / np.sqrt(values.size)) if values.size >= 2 else float("nan")


def first_batches(sc: Scores, dom: EvalDomain, n_batches: int | None) -> Scores:
    """The examples of ``dom``'s first ``n_batches`` batches (all with None)."""
    return sc if n_batches is None else sc.head(min(n_batches, dom.n_batches) * dom.batch_size)


def summarize(
    scores: dict[str, Scores], domains: list[EvalDomain], n_batches: int | None = None
) -> dict[str, dict[str, float]]:
    """``{domain: {"loss", "loss_se", "n"[, "accuracy"]}}`` over each domain's first
    ``n_batches`` batches (all with None). ``loss_se``: the loss's standard error over examples
    (:func:`loss_se`); ``n``: examples evaluated."""
    out = {}
    for dom in domains:
        sc = first_batches(scores[dom.name], dom, n_batches)
        res = {
            "loss": float(sc.nll.sum() / max(sc.tokens.sum(), 1.0)),
            "loss_se": loss_se(sc.nll, sc.tokens),
            "n": int(sc.nll.size),
        }
        if sc.correct is not None:
            res["accuracy"] = float(sc.correct.mean()) if sc.correct.size else 0.0
        out[dom.name] = res
    return out


def evaluate(
    model,
    accelerator,
    domains: list[EvalDomain],
    tokenizer,
    n_batches: int | None = None,
    accuracy: bool = True,
) -> dict[str, dict[str, float]]:
    """``{domain: {"loss", "loss_se", "n"[, "accuracy"]}}`` (accuracy where answers exist)."""
    return summarize(
        evaluate_examples(model, accelerator, domains, tokenizer, n_batches, accuracy), domains
    )


@torch.no_grad()
def evaluate_examples(
    model,
    accelerator,
    domains: list[EvalDomain],
    tokenizer,
    n_batches: int | None = None,
    accuracy: bool = True,
    pack_rows: int | None = None,
) -> dict[str, Scores]:
    """Per-example :class:`Scores` of every domain over its first ``n_batches`` batches.

    ``pack_rows``: pack each batch's examples into rows of at most that many tokens (at least
    the longest example) instead of right-padding them; generation for accuracy stays padded.
    """
    pad_id = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    # FSDP2: every forward is a collective, so every rank runs as many forwards (a rank with no
    # batch left repeats batch 0 and discards it) and generation runs with synced_gpus.
    sharded = FSDPModule is not None and isinstance(model, FSDPModule)
    # One flat buffer: [nll | tokens | correct] per example of every domain, each rank filling
    # the slots of its own batches (zeros elsewhere), summed over ranks once at the end.
    sizes = [
        min(
            len(dom.data),
            (dom.n_batches if n_batches is None else min(n_batches, dom.n_batches))
            * dom.batch_size,
        )
        for dom in domains
    ]
    offsets = np.cumsum([0] + sizes)
    flat = torch.zeros(3, int(offsets[-1]), dtype=torch.float64, device=device)
    for d, dom in enumerate(domains):
        nb = -(-sizes[d] // dom.batch_size)
        end = -(-nb // world) * world if sharded else nb
        for b in range(rank, end, world):
            keep = b < nb
            lo, hi = (
                (b * dom.batch_size, min((b + 1) * dom.batch_size, len(dom.data)))
                if keep
                else (0, min(dom.batch_size, len(dom.data)))
            )
            nll_sum, n_tok = _example_sums(
                model, dom.data.input_ids[lo:hi], dom.data.labels[lo:hi], pad_id, device, pack_rows
            )
            if accuracy and dom.accuracy:
                correct = _generate_and_score(
                    accelerator.unwrap_model(model), tokenizer, dom, lo, hi, device, synced=sharded
                )
            if not keep:
                continue
            at = slice(int(offsets[d]) + lo, int(offsets[d]) + hi)
            flat[0, at] = nll_sum
            flat[1, at] = n_tok
            if accuracy and dom.accuracy:
                flat[2, at] = torch.tensor(correct, dtype=torch.float64, device=device)
    if world > 1:
        flat = accelerator.reduce(flat, reduction="sum")
    if was_training:
        model.train()
    flat = flat.cpu().numpy()
    out = {}
    for d, dom in enumerate(domains):
        at = slice(int(offsets[d]), int(offsets[d + 1]))
        scored = accuracy and dom.accuracy
        out[dom.name] = Scores(
            flat[0, at].copy(), flat[1, at].copy(), flat[2, at].copy() if scored else None
        )
    return out


def _example_sums(
    model, ids: list, labels: list, pad_id: int, device, pack_rows: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and supervised tokens of each example (float64, (n,)), from one batch in
    padded rows, or in packed rows gathered by each target token's example."""
    if pack_rows is None:
        batch = {k: v.to(device) for k, v in collate(ids, labels, pad_id).items()}
        nll, mask = token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return (nll * mask).sum(1).double(), mask.sum(1).double()
    batch = {k: v.to(device) for k, v in pack(ids, labels, None, pack_rows, pad_id).items()}
    nll, mask = token_nll(model, batch["input_ids"], None, batch["labels"], batch["position_ids"])
    seg = batch["segment"]
    return example_sums(nll * mask, seg, len(ids)), example_sums(mask, seg, len(ids))


def _generate_and_score(
    model, tokenizer, dom: EvalDomain, lo: int, hi: int, device, synced: bool = False
) -> list[float]:
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = [dom.data.input_ids[i][: dom.data.prompt_len[i]] for i in range(lo, hi)]
    batch = {k: v.to(device) for k, v in collate_prompts(prompts, pad_id).items()}
    gen = model.generate(
        **batch,
        max_new_tokens=dom.max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        **({"synced_gpus": True} if synced else {}),
    )
    new = gen[:, batch["input_ids"].shape[1] :].tolist()  # host sync: decoding needs the ids
    correct = []
    for i, ids in zip(range(lo, hi), new):
        if eos_id in ids:
            ids = ids[: ids.index(eos_id)]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        correct.append(float(normalize_answer(text) == normalize_answer(dom.data.answers[i] or "")))
    return correct
