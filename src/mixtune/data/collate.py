"""Tokenised examples into tensors, keeping dataset ids for per-domain losses: right-padded rows
(:func:`collate`), or one row of packed examples without padding (:func:`pack`)."""

from __future__ import annotations

import numpy as np
import torch

from mixtune.data.tokenize import IGNORE


def collate(
    ids: list[np.ndarray], labels: list[np.ndarray], pad_id: int, domain: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence. Returns input_ids, labels, attention_mask (B, T)."""
    n, t = len(ids), max(len(x) for x in ids)
    input_ids = np.full((n, t), pad_id, np.int64)
    lab = np.full((n, t), IGNORE, np.int64)
    attn = np.zeros((n, t), np.int64)
    for i, (x, y) in enumerate(zip(ids, labels)):
        input_ids[i, : len(x)] = x
        lab[i, : len(y)] = y
        attn[i, : len(x)] = 1
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(lab),
        "attention_mask": torch.from_numpy(attn),
    }
    if domain is not None:
        batch["domain"] = torch.as_tensor(np.asarray(domain, np.int64))
    return batch


def pack(
    ids: list[np.ndarray], labels: list[np.ndarray], domain: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """Concatenate examples into one row, without padding (``train.packing``).

    Returns input_ids, labels and position_ids (1, N) and ``segment`` (N,), each token's
    example index. Positions restart at 0 for every example, and with no attention mask the
    model (transformers' packed-sequence masking) lets no token attend across examples. Each
    example's first label becomes ``IGNORE``: in a row of one example, token 0 is never a target
    (position t predicts t+1); in a packed row it would be the previous example's last target.
    """
    n = sum(len(x) for x in ids)
    input_ids = np.concatenate(ids).astype(np.int64)
    lab = np.concatenate(labels).astype(np.int64)
    starts = np.cumsum([0] + [len(x) for x in ids[:-1]])
    lab[starts] = IGNORE
    positions = np.concatenate([np.arange(len(x)) for x in ids])
    segment = np.repeat(np.arange(len(ids)), [len(x) for x in ids])
    batch = {
        "input_ids": torch.from_numpy(input_ids).view(1, n),
        "labels": torch.from_numpy(lab).view(1, n),
        "position_ids": torch.from_numpy(positions).view(1, n),
        "segment": torch.from_numpy(segment),
    }
    if domain is not None:
        batch["domain"] = torch.as_tensor(np.asarray(domain, np.int64))
    return batch


def collate_prompts(prompts: list[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation."""
    n, t = len(prompts), max(len(x) for x in prompts)
    input_ids = np.full((n, t), pad_id, np.int64)
    attn = np.zeros((n, t), np.int64)
    for i, x in enumerate(prompts):
        input_ids[i, t - len(x) :] = x
        attn[i, t - len(x) :] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attn)}
