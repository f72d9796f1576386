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
    ids: list[np.ndarray],
    labels: list[np.ndarray],
    domain: np.ndarray | None = None,
    capacity: int | None = None,
    pad_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Examples packed into rows without padding between them (``train.packing``).

    ``capacity``: the most tokens in a row (at least the longest example); examples go into
    rows first-fit by decreasing length, so attention -- quadratic in the row length under a
    dense packed-sequence mask -- stays within rows of about ``max_length`` and the only padding
    is at row ends. None: all examples in one row.

    Returns input_ids, labels and position_ids (R, T) and ``segment`` (R, T): each token's
    example index, -1 on row-end padding. Positions restart at 0 for every example (and for a
    row's padding), and with no attention mask the model (transformers' packed-sequence masking)
    lets no token attend across examples. Each example's first label becomes ``IGNORE``: in a
    row of one example token 0 is never a target (position t predicts t+1); in a packed row it
    would be the previous example's last target.
    """
    lengths = [len(x) for x in ids]
    cap = max(capacity or sum(lengths), max(lengths))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(ids)), key=lambda i: -lengths[i]):  # stable: ties keep order
        r = next((r for r, left in enumerate(room) if left >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(cap)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    t = max(cap - left for left in room)
    shape = (len(rows), t)
    input_ids = np.full(shape, pad_id, np.int64)
    lab = np.full(shape, IGNORE, np.int64)
    positions = np.zeros(shape, np.int64)
    segment = np.full(shape, -1, np.int64)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = lengths[i]
            input_ids[r, at : at + n] = ids[i]
            lab[r, at : at + n] = labels[i]
            lab[r, at] = IGNORE
            positions[r, at : at + n] = np.arange(n)
            segment[r, at : at + n] = i
            at += n
        positions[r, at:] = np.arange(t - at)  # padding: a sequence of its own, never trained
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(lab),
        "position_ids": torch.from_numpy(positions),
        "segment": torch.from_numpy(segment),
    }
    if domain is not None:
        batch["domain"] = torch.as_tensor(np.asarray(domain, np.int64))
    return batch


def target_owner(segment: torch.Tensor) -> torch.Tensor:
    """Which example each target position of packed rows (:func:`pack`'s ``segment``) belongs
    to, flattened to (R * (T-1),): position t predicts token t+1, so it is token t+1's example.
    Row-end padding (-1) maps to 0; it is never a target (its mask is 0)."""
    return segment[:, 1:].clamp(min=0).flatten()


def example_sums(x: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    """Per-example sums (float64, (n,)) of a per-target-position quantity ``x`` (R, T-1) of
    packed rows: e.g. masked NLL, or the mask itself for each example's supervised tokens."""
    out = torch.zeros(n, dtype=torch.float64, device=x.device)
    return out.index_add_(0, target_owner(segment), x.double().flatten())


def collate_prompts(prompts: list[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation."""
    n, t = len(prompts), max(len(x) for x in prompts)
    input_ids = np.full((n, t), pad_id, np.int64)
    attn = np.zeros((n, t), np.int64)
    for i, x in enumerate(prompts):
        input_ids[i, t - len(x) :] = x
        attn[i, t - len(x) :] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attn)}
