"""Probing and look-ahead: short branch runs from a snapshot, then an exact restore.

Each function takes the run's :class:`~mixtune.engine.state.TrainState`, takes a
:class:`~mixtune.engine.snapshot.Snapshot` (trainable tensors, optimizer, scheduler, RNG,
sampler), runs its branch and restores the snapshot, so the run continues bit-identically, as
if the branch had never happened.

- :func:`probe` (DynaMiCS): train ``steps`` real optimizer steps on one dataset only, with the
  run's optimizer and LR schedule, evaluate every domain, restore.
- :func:`lookahead` (DynamixSFT): per-example loss on a mini-batch of one dataset, one virtual
  step, the loss again on the same examples, restore. ``optimizer="sgd"`` takes a plain gradient
  step at the current LR (no optimizer state involved); ``"adam"`` steps the run's AdamW from its
  current moments. No gradient clipping in the virtual step.
- :func:`example_losses`: the look-ahead's L_pre alone (forward only, no step).
- :func:`~mixtune.engine.alignment.grad_alignment` (DynaMiCS's slopes) lives in
  :mod:`mixtune.engine.alignment`.

Dropout in the look-ahead (``lookahead`` and ``example_losses``):

1. Losses are measured without dropout: L_pre, L_post and :func:`example_losses` come from
   eval-mode forwards, so the reward (L_pre - L_post) / L_pre is the effect of the step, not of
   two different dropout masks. The virtual step's gradient is the one a real training step
   would take (train mode, dropout on). With active dropout that costs one more forward (eval,
   no grad) for L_pre; without (p = 0 everywhere, the usual case) L_pre is read off the
   back-propagated forward as before, bit-identically and at the same cost.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from mixtune.data.collate import collate
from mixtune.data.sampler import shard
from mixtune.engine.alignment import grad_alignment
from mixtune.engine.checkpoint import rng_state, set_rng_state
from mixtune.engine.process import local
from mixtune.engine.snapshot import Snapshot, unwrap_optimizer
from mixtune.engine.state import TrainState
from mixtune.losses.core import reduce, sequence_mean
from mixtune.losses.logits import token_nll
from mixtune.mixers.base import LookaheadResult

__all__ = [
    "Snapshot",
    "example_losses",
    "grad_alignment",
    "lookahead",
    "probe",
    "unwrap_optimizer",
]


def probe(
    state: TrainState,
    j: int,
    steps: int,
    n_batches: int | None = None,
    accuracy: bool = False,
    per_example: bool = False,
) -> dict[str, dict]:
    """Metrics of every domain after ``steps`` steps on dataset ``j`` alone; state restored.
    ``per_example``: as :meth:`Trainer.evaluate` (per-example scores for paired slopes)."""
    snap = Snapshot(state)
    try:
        s = state.sampler
        s.repeat = np.ones_like(s.repeat)  # a probe may cycle a small dataset
        s.exhausted[:] = False
        s.set_weights(np.eye(len(s.names))[j])
        for _ in range(steps):
            ds, ex = s.next_batch(state.batch_size)
            state.train_step(ds, ex)
        return state.evaluate(
            n_batches, accuracy=accuracy, use_cache=False, per_example=per_example
        )
    finally:
        snap.restore()


def _reward_batch(state: TrainState, j: int, batch_size: int | None, key: int | None):
    """A global mini-batch of dataset ``j`` drawn apart from the sampler's stream (same ids on
    every rank, keyed by ``key`` or the step), and this rank's shard of it, collated on device."""
    n = batch_size or state.micro * state.world
    n = max(state.world, n - n % state.world)
    ex = state.sampler.draw_from(j, n, state.step if key is None else key)
    mine = ex[shard(n, state.world, state.rank, n // state.world)[0]]
    data = state.train_sets[j].data
    batch = collate(
        [data.input_ids[i] for i in mine], [data.labels[i] for i in mine], state.pad_token_id
    )
    return ex, {k: v.to(state.acc.device) for k, v in batch.items()}


def lookahead(
    state: TrainState,
    j: int,
    optimizer: str = "sgd",
    batch_size: int | None = None,
    key: int | None = None,
) -> LookaheadResult:
    """Per-example relative-loss material for DynamixSFT's reward on dataset ``j``.

    1. Dropout: L_pre and L_post are eval-mode forwards, else the two passes draw different
       masks and the reward mixes the step's effect with dropout noise. The virtual step's
       gradient comes from a train-mode forward, dropout on, so the step measured is the one
       the run would take. With active dropout L_pre therefore needs its own forward (eval, no
       grad: one more per look-ahead). With none (:func:`_active_dropout` false, the usual case)
       both modes compute the same, so L_pre is read off the back-propagated forward as before:
       same cost, same bits. Every rank holds the same modules and takes the same branch (FSDP2
       needs that); the train-mode forward's masks come from the RNG, which the restore resets.

    2. fp16 (``train.mixed_precision: fp16``): the virtual step's backward is loss-scaled with
       the run's current scale and unscaled before the step, as the real step is, so small
       gradients do not flush to zero in float16; a gradient that overflows there takes no
       virtual step (the real step would be skipped too). The scaler itself is not changed.
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"lookahead optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    t0 = time.perf_counter()
    ex, batch = _reward_batch(state, j, batch_size, key)
    n_tokens = float(state.train_sets[j].label_counts[ex].sum())
    noisy = _active_dropout(state.model)
    snap = Snapshot(state, optimizer=optimizer == "adam")
    try:
        if noisy:  # eval forward first: it draws no RNG, so the gradient's masks are unchanged
            with torch.no_grad(), state.acc.autocast(), _eval_mode(state.model):
                pre = _sequence_losses(state.model, batch)  # (b,)
        with state.acc.autocast():
            nll, mask = token_nll(
                state.model, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            if not noisy:
                pre = sequence_mean(nll.detach(), mask)  # (b,)
            loss = reduce(nll, mask, n_tokens=n_tokens) * state.world
            state.acc.backward(loss if state.scaler is None else state.scaler.scale_loss(loss))
        if state.scaler is not None and not _unscaled_finite(state):
            state.optimizer.zero_grad(set_to_none=True)  # fp16 overflow: no virtual step,
        if optimizer == "sgd":  # as the real step would skip (post = the unchanged model)
            lr = unwrap_optimizer(state.optimizer).param_groups[0]["lr"]
            with torch.no_grad():
                for p in state.params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-lr)
        else:
            state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        quiet = _eval_mode(state.model) if noisy else contextlib.nullcontext()
        with torch.no_grad(), state.acc.autocast(), quiet:
            post = _sequence_losses(state.model, batch)
        if state.world > 1:
            pre, post = state.acc.gather(pre.contiguous()), state.acc.gather(post.contiguous())
    finally:
        snap.restore()
    return LookaheadResult(
        pre.double().cpu().numpy(), post.double().cpu().numpy(), time.perf_counter() - t0
    )


def _unscaled_finite(state: TrainState) -> bool:
    """Unscale the look-ahead's fp16 gradients in place; whether all are finite on every rank
    (one host sync, fp16 runs only)."""
    state.scaler.unscale_(state.params)
    grads = [p.grad for p in state.params if p.grad is not None]
    bad = torch.stack([~torch.isfinite(local(g)).all() for g in grads]).sum().double()
    if state.world > 1:
        bad = state.acc.reduce(bad, reduction="sum")
    return not bad.item()


def example_losses(
    state: TrainState, j: int, batch_size: int | None = None, key: int | None = None
) -> np.ndarray:
    """Per-example mean token loss, (n,), on the mini-batch of dataset ``j`` that
    :func:`lookahead` would draw for the same ``(batch_size, key)``: forward only, no step.

    Eval mode (no dropout), as :func:`lookahead` measures L_pre; the modules' modes come back
    afterwards. Nothing changes: no gradient, and the RNG is restored (a model may still draw
    from it). Gathered over ranks, so every rank gets the same numbers.
    """
    ex, batch = _reward_batch(state, j, batch_size, key)
    rng = rng_state()
    try:
        with torch.no_grad(), state.acc.autocast(), _eval_mode(state.model):
            loss = _sequence_losses(state.model, batch)  # (b,)
        if state.world > 1:
            loss = state.acc.gather(loss.contiguous())
    finally:
        set_rng_state(rng)
    return loss.double().cpu().numpy()


def _sequence_losses(model, batch) -> torch.Tensor:
    """Per-example mean token loss of ``batch``, (b,), under the caller's grad/autocast/mode."""
    return sequence_mean(
        *token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    )


def _active_dropout(model) -> bool:
    """Whether a forward of ``model`` in its current mode can drop anything.

    A module in train mode counts if it is a dropout layer with p > 0 (``nn.Dropout`` and kin;
    peft's LoRA dropout is one, an ``nn.Identity`` at p = 0) or holds a float rate > 0 under a
    name ending in ``dropout`` or ``pdrop``: transformers' attention dropout is functional
    (``LlamaAttention.attention_dropout``), with no layer to find. A false positive costs one
    forward; a false negative brings back the dropout noise in the reward.
    """
    for m in model.modules():
        if not m.training:
            continue
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            if m.p > 0:
                return True
        elif any(
            isinstance(v, float) and v > 0 and k.endswith(("dropout", "pdrop"))
            for k, v in vars(m).items()
        ):
            return True
    return False


@contextlib.contextmanager
def _eval_mode(model):
    """Every module in eval mode for the block; each one's own mode back afterwards (a mixed
    train/eval model stays mixed), also when the block raises."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
