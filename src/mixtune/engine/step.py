"""One optimizer step: micro-batches, gradient accumulation, clipping, the non-finite guard.

The global batch ``(ds, ex)`` is the same on every rank; each rank collates its shard into
micro-batches (:func:`mixtune.data.sampler.shard`). The loss's ``prepare`` sees all of them
before any forward (statistics over the whole step), then each micro-batch runs forward,
per-token loss and one reduction divided by the step's *global* supervised-token count, and
backward; only the last one all-reduces gradients. Summed over micro-batches and ranks that is
the full-batch loss, so 8 micro-batches of 1 give the gradient of 1 of 8. A non-finite gradient
norm never reaches the weights: the run stops, or (``train.nonfinite: skip``) the update is
dropped without stepping the optimizer or the LR schedule. Under fp16 the loss is scaled before
backward and the gradients unscaled before clipping (:mod:`mixtune.engine.precision`); an
overflow with a finite loss is the scaler's business: the update is dropped the same way and
the scale halved.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from mixtune.config import TrainConfig
from mixtune.data.collate import collate, pack, target_owner
from mixtune.data.sampler import shard, token_shard
from mixtune.engine.process import local, whole
from mixtune.engine.state import TrainState
from mixtune.errors import TrainingError
from mixtune.losses.base import Loss
from mixtune.losses.core import reduce
from mixtune.losses.logits import loss_terms


@dataclass
class StepStats:
    per_dataset: torch.Tensor  # (K, 2): NLL sum and supervised tokens per dataset, this rank
    grad_norm: torch.Tensor  # () global gradient norm before clipping
    skipped: bool = False  # non-finite, update dropped (train.nonfinite=skip)
    overflow: bool = False  # fp16: gradients overflowed at this loss scale, update dropped
    loss_scale: float | None = None  # fp16: the scale after this step


def optimizer_step(
    state: TrainState, loss_fn: Loss, ds: np.ndarray, ex: np.ndarray, tc: TrainConfig
) -> StepStats:
    """One optimizer step on the global batch ``(ds, ex)``; this rank does its shard."""
    K, device, sets = len(state.train_sets), state.acc.device, state.train_sets
    scaler = state.scaler  # fp16 only (engine/precision.py)
    # Global supervised-token count: every rank knows the whole batch, so no all-reduce.
    n_tokens = float(sum(sets[k].label_counts[e] for k, e in zip(ds, ex)))
    stats = torch.zeros(K, 2, dtype=torch.float64, device=device)
    batches = []
    for sl in micro_batches(state, ds, ex, tc):
        d, e = ds[sl], ex[sl]
        ids = [sets[k].data.input_ids[j] for k, j in zip(d, e)]
        labels = [sets[k].data.labels[j] for k, j in zip(d, e)]
        # Packed rows of about max_length tokens, no padding between examples; examples of one
        # length have no padding to remove, and plain rows spare the packed attention mask.
        if tc.packing is True and len({len(x) for x in ids}) > 1:
            batch = pack(ids, labels, d, tc.max_length, state.pad_token_id)
        else:
            batch = collate(ids, labels, state.pad_token_id, d)
        batch["index"] = torch.as_tensor(e, dtype=torch.long)
        batches.append({k: v.to(device) for k, v in batch.items()})
    # The loss may need the whole step first (statistics over the global batch).
    extras = loss_fn.prepare(state, batches)
    for i, batch in enumerate(batches):
        # Only the last micro-batch all-reduces gradients.
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last else state.acc.no_sync(state.model)
        with sync, state.acc.autocast():
            terms = loss_terms(loss_fn, state.model, batch, extras[i])
            # DDP averages gradients over ranks; x world turns that into the global sum.
            loss = (
                reduce(
                    terms.per_token,
                    terms.mask,
                    terms.token_weights,
                    terms.sample_weights,
                    n_tokens,
                )
                * state.world
            )
            # fp16: x the loss scale, so small activation gradients survive float16's range
            state.acc.backward(loss if scaler is None else scaler.scale_loss(loss))
        if "segment" in batch:  # packed rows: each target token's example -> its dataset
            where = batch["domain"][target_owner(batch["segment"])]
            nll = (terms.per_token.detach() * terms.mask).double().flatten()
            stats[:, 0].index_add_(0, where, nll)
            stats[:, 1].index_add_(0, where, terms.mask.double().flatten())
        else:
            seq_nll = (terms.per_token.detach() * terms.mask).sum(-1).double()  # (B,)
            stats[:, 0].index_add_(0, batch["domain"], seq_nll)
            stats[:, 1].index_add_(0, batch["domain"], terms.mask.sum(-1).double())
    if scaler is not None:
        scaler.unscale_(state.params)  # clip and log the true gradients
    max_norm = tc.max_grad_norm or float("inf")
    grad_norm = whole(state.acc.clip_grad_norm_(state.params, max_norm))
    # Host sync, once per step: a non-finite gradient must never reach the weights.
    # The norm is global (all ranks agree), so every rank takes the same branch.
    if not torch.isfinite(grad_norm):
        if scaler is not None and _overflow(state, stats, scaler):
            scaler.backoff()  # the loss scale was too large: skip, as GradScaler does
            state.optimizer.zero_grad(set_to_none=True)
            return StepStats(
                stats, grad_norm.detach().double(), overflow=True, loss_scale=scaler.scale
            )
        if tc.nonfinite == "stop":
            raise TrainingError(
                f"non-finite loss/gradient at step {state.step + 1} (grad norm "
                f"{float(grad_norm)}); lower train.lr, enable clipping (train.max_grad_norm),"
                " check the data, or set train.nonfinite=skip. The last checkpoint is intact."
            )
        state.optimizer.zero_grad(set_to_none=True)  # drop the update: no optimizer,
        return StepStats(stats, grad_norm.detach().double(), skipped=True)  # no scheduler
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()
    return StepStats(stats, grad_norm.detach().double())


def _overflow(state: TrainState, stats: torch.Tensor, scaler) -> bool:
    """Whether a non-finite fp16 gradient is a loss-scale overflow (skip and halve the scale)
    rather than divergence (``train.nonfinite``): the loss was finite on every rank and the
    scale is above 1 (at 1 or below, the gradients overflow float16 unscaled)."""
    bad = (~torch.isfinite(stats[:, 0])).any().double()
    if state.world > 1:  # every rank is in this branch: the norm is global
        bad = state.acc.reduce(bad, reduction="sum")
    return scaler.scale > 1 and not bad.item()  # host sync, on overflow steps only


def micro_batches(
    state: TrainState, ds: np.ndarray, ex: np.ndarray, tc: TrainConfig
) -> list[slice] | list[np.ndarray]:
    """This rank's micro-batches of the global batch: ``state.micro`` examples each, or filled by
    the token budget ``train.micro_batch_tokens`` (:func:`mixtune.data.sampler.token_shard`)."""
    if tc.micro_batch_tokens is None:
        return shard(len(ds), state.world, state.rank, state.micro)
    sets = state.train_sets
    lengths = [len(sets[k].data.input_ids[j]) for k, j in zip(ds, ex)]
    return token_shard(
        lengths, state.world, state.rank, tc.micro_batch_tokens, packed=tc.packing is True
    )


def check_finite_params(state: TrainState, tc: TrainConfig) -> None:
    """TrainingError if any trainable parameter is non-finite, on any rank.

    A finite gradient can still overflow the weights (an absurd lr or weight decay): such
    weights must never be written over a good checkpoint. One host sync, at checkpoints only.
    """
    bad = torch.stack([~torch.isfinite(local(p)).all() for p in state.params]).sum().double()
    if state.world > 1:
        bad = state.acc.reduce(bad, reduction="sum")
    if bad.item():
        raise TrainingError(
            f"parameters became non-finite by step {state.step} (train.lr={tc.lr:g}, "
            f"weight_decay={tc.weight_decay:g}); lower them. Nothing was saved for this step; "
            "the last checkpoint is intact."
        )
