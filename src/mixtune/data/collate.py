"""Pad a list of tokenised examples into tensors, keeping dataset ids for per-domain losses."""

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


def collate_prompts(prompts: list[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation."""
    n, t = len(prompts), max(len(x) for x in prompts)
    input_ids = np.full((n, t), pad_id, np.int64)
    attn = np.zeros((n, t), np.int64)
    for i, x in enumerate(prompts):
        input_ids[i, t - len(x) :] = x
        attn[i, t - len(x) :] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attn)}
