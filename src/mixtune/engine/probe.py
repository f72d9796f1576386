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
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from mixtune.data.collate import collate
from mixtune.data.sampler import shard
from mixtune.engine.checkpoint import rng_state, set_rng_state
from mixtune.losses import reduce, sequence_mean, token_losses
from mixtune.mixers.base import LookaheadResult


class Snapshot:
    def __init__(self, trainer, optimizer: bool = True):
        self.trainer = trainer
        self.params = [p.detach().clone() for p in trainer.params]
        self.opt = _inner(trainer.optimizer)
        self.with_opt = optimizer
        if optimizer:
            self.opt_state = {p: {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
                                  for k, v in s.items()} for p, s in self.opt.state.items()}
            self.groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                           for g in self.opt.param_groups]
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
                    if torch.is_tensor(v) and torch.is_tensor(cur.get(k)) and cur[k].shape == v.shape:
                        cur[k].copy_(v)
                    else:
                        cur[k] = v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
            for g, saved in zip(self.opt.param_groups, self.groups):
                g.update(copy.deepcopy(saved))
            t.scheduler.load_state_dict(copy.deepcopy(self.sched))
        set_rng_state(self.rng)
        t.sampler.repeat = self.repeat.copy()
        t.sampler.load_state_dict(copy.deepcopy(self.sampler))


def probe(trainer, j: int, steps: int, n_batches: int | None = None,
          accuracy: bool = False) -> dict[str, dict[str, float]]:
    """Metrics of every domain after ``steps`` steps on dataset ``j`` alone; state restored."""
    snap = Snapshot(trainer)
    try:
        s = trainer.sampler
        s.repeat = np.ones_like(s.repeat)  # a probe may cycle a small dataset
        s.exhausted[:] = False
        s.set_weights(np.eye(len(s.names))[j])
        for _ in range(steps):
            ds, ex = s.next_batch(trainer.cfg.train.batch_size)
            trainer.train_step(ds, ex)
        return trainer.evaluate(n_batches, accuracy=accuracy, use_cache=False)
    finally:
        snap.restore()


def lookahead(trainer, j: int, optimizer: str = "sgd", batch_size: int | None = None,
              key: int | None = None) -> LookaheadResult:
    """Per-example relative-loss material for DynamixSFT's reward on dataset ``j``."""
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"lookahead optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    t0 = time.perf_counter()
    t = trainer
    n = batch_size or t.micro * t.world
    n = max(t.world, n - n % t.world)
    ex = t.sampler.draw_from(j, n, t.step if key is None else key)
    mine = ex[shard(n, t.world, t.rank, n // t.world)[0]]
    data = t.train_sets[j].data
    batch = collate([data.input_ids[i] for i in mine], [data.labels[i] for i in mine],
                    t.tokenizer.pad_token_id)
    batch = {k: v.to(t.acc.device) for k, v in batch.items()}
    n_tokens = float(t.train_sets[j].label_counts[ex].sum())
    snap = Snapshot(t, optimizer=optimizer == "adam")
    try:
        with t.acc.autocast():
            logits = t.model(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
            nll, mask = token_losses(logits, batch["labels"])
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
        with torch.no_grad(), t.acc.autocast():
            logits = t.model(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
            post = sequence_mean(*token_losses(logits, batch["labels"]))
        if t.world > 1:
            pre, post = t.acc.gather(pre.contiguous()), t.acc.gather(post.contiguous())
    finally:
        snap.restore()
    return LookaheadResult(pre.double().cpu().numpy(), post.double().cpu().numpy(),
                           time.perf_counter() - t0)


def _inner(optimizer):
    """The torch optimizer behind accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
