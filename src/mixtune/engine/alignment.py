"""Gradient alignment: DynaMiCS's first-order slopes of each domain's loss in each dataset.

Instead of training a branch on dataset j and evaluating (:func:`mixtune.engine.probe.probe`),
the change of domain i's loss after one step on j is predicted from gradients: the evaluation
gradient of i against the update direction the run's AdamW would take on a batch of j. One
backward per domain and per dataset, no optimizer step; the run's state is left as it was.
"""

from __future__ import annotations

import numpy as np
import torch

from mixtune.data.collate import collate
from mixtune.data.sampler import shard
from mixtune.engine.snapshot import Snapshot, unwrap_optimizer
from mixtune.engine.state import TrainState
from mixtune.losses.logits import token_nll


def grad_alignment(
    state: TrainState,
    n_batches: int | None = None,
    batch_size: int | None = None,
    key: int | None = None,
) -> np.ndarray:
    """DynaMiCS's gradient-alignment slopes, (M, K): S_ij = −lr·⟨g_i, d_j⟩.

    g_i is the gradient of domain i's token-mean evaluation loss over its first ``n_batches``
    batches; d_j the bias-corrected Adam direction m̂/(√v̂ + eps) the run's optimizer would take
    from its current moments after the gradient of a batch of dataset j (drawn as
    :func:`mixtune.engine.probe.lookahead` draws it). Gradients go through the unwrapped model
    and are summed over ranks here, so ranks may hold different numbers of batches (not for
    FSDP). Nothing changes.
    """
    model = state.acc.unwrap_model(state.model)
    opt = unwrap_optimizer(state.optimizer)
    was_training = model.training
    snap = Snapshot(state, optimizer=False)
    try:
        model.eval()
        g_eval = []
        for dom in state.domains:
            nb = dom.n_batches if n_batches is None else min(n_batches, dom.n_batches)
            tokens = torch.zeros((), dtype=torch.float64, device=state.acc.device)
            for b in range(state.rank, nb, state.world):
                lo, hi = b * dom.batch_size, min((b + 1) * dom.batch_size, len(dom.data))
                tokens += _backward_nll_sum(
                    state, model, dom.data.input_ids[lo:hi], dom.data.labels[lo:hi]
                )
            g_eval.append(_reduced_grad(state, tokens))
        model.train(was_training)
        S = np.zeros((len(state.domains), len(state.train_sets)))
        lr = opt.param_groups[0]["lr"]
        for j, train_set in enumerate(state.train_sets):
            n = batch_size or state.micro * state.world
            n = max(state.world, n - n % state.world)
            ex = state.sampler.draw_from(j, n, state.step if key is None else key)
            mine = ex[shard(n, state.world, state.rank, n // state.world)[0]]
            tokens = _backward_nll_sum(
                state,
                model,
                [train_set.data.input_ids[i] for i in mine],
                [train_set.data.labels[i] for i in mine],
            )
            d = _adam_direction(state, opt, _reduced_grad(state, tokens))
            S[:, j] = [-lr * float(g @ d) for g in g_eval]
    finally:
        model.train(was_training)
        snap.restore()
    return S


def _backward_nll_sum(state: TrainState, model, input_ids, labels) -> torch.Tensor:
    """Backward of the summed token NLL of one batch; returns its supervised token count."""
    batch = collate(input_ids, labels, state.pad_token_id)
    batch = {k: v.to(state.acc.device) for k, v in batch.items()}
    with state.acc.autocast():
        nll, mask = token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        (nll * mask).sum().backward()
    return mask.sum().double()


def _reduced_grad(state: TrainState, tokens: torch.Tensor) -> torch.Tensor:
    """Token-mean gradient over all ranks, flat in ``params`` order (float64); clears grads."""
    flat = torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
            for p in state.params
        ]
    )
    for p in state.params:
        p.grad = None
    if state.world > 1:
        flat = state.acc.reduce(flat, reduction="sum")
        tokens = state.acc.reduce(tokens, reduction="sum")
    return flat / tokens.clamp(min=1)


def _adam_direction(state: TrainState, opt, grad: torch.Tensor) -> torch.Tensor:
    """m̂/(√v̂ + eps) after folding ``grad`` into each parameter's current Adam moments."""
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    out, i = [], 0
    for p in state.params:
        g = grad[i : i + p.numel()]
        i += p.numel()
        hp, state = group[id(p)], opt.state.get(p, {})
        b1, b2 = hp["betas"]
        m = state["exp_avg"].flatten().double() if "exp_avg" in state else torch.zeros_like(g)
        v = state["exp_avg_sq"].flatten().double() if "exp_avg_sq" in state else torch.zeros_like(g)
        k = float(state["step"]) + 1 if "step" in state else 1.0
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        out.append((m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + hp["eps"]))
    return torch.cat(out)
