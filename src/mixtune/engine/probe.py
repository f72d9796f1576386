"""Probing and look-ahead: short branch runs from a snapshot, then an exact restore.

A :class:`Snapshot` holds the trainable tensors (for LoRA only the adapter), the optimizer state
and hyper-parameters, the LR scheduler, every RNG, and the sampler position. ``restore()`` copies
them back in place, so after a probe or a look-ahead the run continues bit-identically — as if
the branch had never happened. Memory is proportional to the trainable parameters.

- :func:`probe` (DynaMiCS): train ``steps`` real optimizer steps on one dataset only, with the
  run's optimizer and LR schedule, evaluate every domain, restore.
- :func:`lookahead` (DynamixSFT): per-example loss on a mini-batch of one dataset, one virtual
  step, the loss again on the same examples, restore. ``optimizer="sgd"`` takes a plain gradient
  step at the current LR (no optimizer state involved); ``"adam"`` steps the run's AdamW from its
  current moments. No gradient clipping in the virtual step.

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
import copy
import time

import numpy as np
import torch

from mixtune.data.collate import collate
from mixtune.data.sampler import shard
from mixtune.engine.checkpoint import rng_state, set_rng_state
from mixtune.losses.core import reduce, sequence_mean, token_losses
from mixtune.mixers.base import LookaheadResult

try:  # FSDP2 (torch >= 2.6); absent in builds without distributed support
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover
    FSDPModule = None


class Snapshot:
    def __init__(self, trainer, optimizer: bool = True):
        self.trainer = trainer
        self.params = [p.detach().clone() for p in trainer.params]
        self.opt = _inner(trainer.optimizer)
        self.with_opt = optimizer
        if optimizer:
            self.opt_state = {
                p: {
                    k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in s.items()
                }
                for p, s in self.opt.state.items()
            }
            self.groups = [
                {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                for g in self.opt.param_groups
            ]
            self.sched = copy.deepcopy(trainer.scheduler.state_dict())
        self.rng = rng_state()
        self.sampler = copy.deepcopy(trainer.sampler.state_dict())
        self.repeat = trainer.sampler.repeat.copy()

    @torch.no_grad()
    def restore(self) -> None:
        t = self.trainer
        for p, saved in zip(t.params, self.params):
            p.copy_(saved)
            p.grad = None
        if self.with_opt:
            for p in list(self.opt.state):
                if p not in self.opt_state:
                    del self.opt.state[p]
            for p, saved in self.opt_state.items():
                cur = self.opt.state.setdefault(p, {})
                for k, v in saved.items():
                    same = torch.is_tensor(cur.get(k)) and cur[k].shape == v.shape
                    if torch.is_tensor(v) and same:
                        cur[k].copy_(v)
                    else:
                        cur[k] = v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
            for g, saved in zip(self.opt.param_groups, self.groups):
                g.update(copy.deepcopy(saved))
            t.scheduler.load_state_dict(copy.deepcopy(self.sched))
        _drop_gathered(t.model)
        set_rng_state(self.rng)
        t.sampler.repeat = self.repeat.copy()
        t.sampler.load_state_dict(copy.deepcopy(self.sampler))


def _drop_gathered(model) -> None:
    """FSDP2: free gathered (unsharded) parameters so the next forward re-gathers the shards.

    After a forward without a backward (an evaluation, the look-ahead's second pass) FSDP2
    keeps the root module's parameters gathered; a restore writes the shards only, and the next
    forward would run on the gathered copy of the probe's values. ``reshard()`` is local (no
    communication). Nothing to do without FSDP2.
    """
    if FSDPModule is None:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def probe(
    trainer,
    j: int,
    steps: int,
    n_batches: int | None = None,
    accuracy: bool = False,
    per_example: bool = False,
) -> dict[str, dict]:
    """Metrics of every domain after ``steps`` steps on dataset ``j`` alone; state restored.
    ``per_example``: as :meth:`Trainer.evaluate` (per-example scores for paired slopes)."""
    snap = Snapshot(trainer)
    try:
        s = trainer.sampler
        s.repeat = np.ones_like(s.repeat)  # a probe may cycle a small dataset
        s.exhausted[:] = False
        s.set_weights(np.eye(len(s.names))[j])
        for _ in range(steps):
            ds, ex = s.next_batch(trainer.cfg.train.batch_size)
            trainer.train_step(ds, ex)
        return trainer.evaluate(
            n_batches, accuracy=accuracy, use_cache=False, per_example=per_example
        )
    finally:
        snap.restore()


def _reward_batch(t, j: int, batch_size: int | None, key: int | None):
    """A global mini-batch of dataset ``j`` drawn apart from the sampler's stream (same ids on
    every rank, keyed by ``key`` or the step), and this rank's shard of it, collated on device."""
    n = batch_size or t.micro * t.world
    n = max(t.world, n - n % t.world)
    ex = t.sampler.draw_from(j, n, t.step if key is None else key)
    mine = ex[shard(n, t.world, t.rank, n // t.world)[0]]
    data = t.train_sets[j].data
    batch = collate(
        [data.input_ids[i] for i in mine], [data.labels[i] for i in mine], t.tokenizer.pad_token_id
    )
    return ex, {k: v.to(t.acc.device) for k, v in batch.items()}


def lookahead(
    trainer, j: int, optimizer: str = "sgd", batch_size: int | None = None, key: int | None = None
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
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"lookahead optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    t0 = time.perf_counter()
    t = trainer
    ex, batch = _reward_batch(t, j, batch_size, key)
    n_tokens = float(t.train_sets[j].label_counts[ex].sum())
    noisy = _active_dropout(t.model)
    snap = Snapshot(t, optimizer=optimizer == "adam")
    try:
        if noisy:  # eval forward first: it draws no RNG, so the gradient's masks are unchanged
            with torch.no_grad(), t.acc.autocast(), _eval_mode(t.model):
                pre = _sequence_losses(t.model, batch)  # (b,)
        with t.acc.autocast():
            logits = t.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            nll, mask = token_losses(logits, batch["labels"])
            if not noisy:
                pre = sequence_mean(nll.detach(), mask)  # (b,)
            t.acc.backward(reduce(nll, mask, n_tokens=n_tokens) * t.world)
        if optimizer == "sgd":
            lr = _inner(t.optimizer).param_groups[0]["lr"]
            with torch.no_grad():
                for p in t.params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-lr)
        else:
            t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        quiet = _eval_mode(t.model) if noisy else contextlib.nullcontext()
        with torch.no_grad(), t.acc.autocast(), quiet:
            post = _sequence_losses(t.model, batch)
        if t.world > 1:
            pre, post = t.acc.gather(pre.contiguous()), t.acc.gather(post.contiguous())
    finally:
        snap.restore()
    return LookaheadResult(
        pre.double().cpu().numpy(), post.double().cpu().numpy(), time.perf_counter() - t0
    )


def example_losses(
    trainer, j: int, batch_size: int | None = None, key: int | None = None
) -> np.ndarray:
    """Per-example mean token loss, (n,), on the mini-batch of dataset ``j`` that
    :func:`lookahead` would draw for the same ``(batch_size, key)``: forward only, no step.

    Eval mode (no dropout), as :func:`lookahead` measures L_pre; the modules' modes come back
    afterwards. Nothing changes: no gradient, and the RNG is restored (a model may still draw
    from it). Gathered over ranks, so every rank gets the same numbers.
    """
    t = trainer
    ex, batch = _reward_batch(t, j, batch_size, key)
    rng = rng_state()
    try:
        with torch.no_grad(), t.acc.autocast(), _eval_mode(t.model):
            loss = _sequence_losses(t.model, batch)  # (b,)
        if t.world > 1:
            loss = t.acc.gather(loss.contiguous())
    finally:
        set_rng_state(rng)
    return loss.double().cpu().numpy()


def _sequence_losses(model, batch) -> torch.Tensor:
    """Per-example mean token loss of ``batch``, (b,), under the caller's grad/autocast/mode."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_mean(*token_losses(logits, batch["labels"]))


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


def grad_alignment(
    trainer, n_batches: int | None = None, batch_size: int | None = None, key: int | None = None
) -> np.ndarray:
    """DynaMiCS's gradient-alignment slopes, (M, K): S_ij = −lr·⟨g_i, d_j⟩.

    g_i is the gradient of domain i's token-mean evaluation loss over its first ``n_batches``
    batches; d_j the bias-corrected Adam direction m̂/(√v̂ + eps) the run's optimizer would take
    from its current moments after the gradient of a batch of dataset j (drawn as
    :func:`lookahead` draws it). Gradients go through the unwrapped model and are summed over
    ranks here, so ranks may hold different numbers of batches (not for FSDP). Nothing changes.
    """
    t = trainer
    model = t.acc.unwrap_model(t.model)
    opt = _inner(t.optimizer)
    was_training = model.training
    snap = Snapshot(t, optimizer=False)
    try:
        model.eval()
        g_eval = []
        for dom in t.domains:
            nb = dom.n_batches if n_batches is None else min(n_batches, dom.n_batches)
            tokens = torch.zeros((), dtype=torch.float64, device=t.acc.device)
            for b in range(t.rank, nb, t.world):
                lo, hi = b * dom.batch_size, min((b + 1) * dom.batch_size, len(dom.data))
                tokens += _backward_nll_sum(
                    t, model, dom.data.input_ids[lo:hi], dom.data.labels[lo:hi]
                )
            g_eval.append(_reduced_grad(t, tokens))
        model.train(was_training)
        S = np.zeros((len(t.domains), len(t.train_sets)))
        lr = opt.param_groups[0]["lr"]
        for j, train_set in enumerate(t.train_sets):
            n = batch_size or t.micro * t.world
            n = max(t.world, n - n % t.world)
            ex = t.sampler.draw_from(j, n, t.step if key is None else key)
            mine = ex[shard(n, t.world, t.rank, n // t.world)[0]]
            tokens = _backward_nll_sum(
                t,
                model,
                [train_set.data.input_ids[i] for i in mine],
                [train_set.data.labels[i] for i in mine],
            )
            d = _adam_direction(t, opt, _reduced_grad(t, tokens))
            S[:, j] = [-lr * float(g @ d) for g in g_eval]
    finally:
        model.train(was_training)
        snap.restore()
    return S


def _backward_nll_sum(t, model, input_ids, labels) -> torch.Tensor:
    """Backward of the summed token NLL of one batch; returns its supervised token count."""
    batch = collate(input_ids, labels, t.tokenizer.pad_token_id)
    batch = {k: v.to(t.acc.device) for k, v in batch.items()}
    with t.acc.autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, mask = token_losses(logits, batch["labels"])
        (nll * mask).sum().backward()
    return mask.sum().double()


def _reduced_grad(t, tokens: torch.Tensor) -> torch.Tensor:
    """Token-mean gradient over all ranks, flat in ``t.params`` order (float64); clears grads."""
    flat = torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
            for p in t.params
        ]
    )
    for p in t.params:
        p.grad = None
    if t.world > 1:
        flat = t.acc.reduce(flat, reduction="sum")
        tokens = t.acc.reduce(tokens, reduction="sum")
    return flat / tokens.clamp(min=1)


def _adam_direction(t, opt, grad: torch.Tensor) -> torch.Tensor:
    """m̂/(√v̂ + eps) after folding ``grad`` into each parameter's current Adam moments."""
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    out, i = [], 0
    for p in t.params:
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


def _inner(optimizer):
    """The torch optimizer behind accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
