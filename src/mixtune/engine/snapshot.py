"""Snapshot: the trainable state of a run, taken before a branch run and restored after it.

A :class:`Snapshot` holds the trainable tensors (for LoRA only the adapter; under FSDP2 this
rank's shards), the optimizer state and hyper-parameters, the LR scheduler, every RNG, the fp16
loss scale, and the sampler position. ``restore()`` copies them back in place, so after a
probe or a look-ahead (:mod:`mixtune.engine.probe`) the run continues bit-identically, as if
the branch had never happened. Memory is proportional to the trainable parameters, not the model.
"""

from __future__ import annotations

import copy

import torch

from mixtune.engine.checkpoint import rng_state, set_rng_state
from mixtune.engine.state import TrainState

try:  # FSDP2 (torch >= 2.6); absent in builds without distributed support
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover
    FSDPModule = None


class Snapshot:
    """Everything a branch run may change; ``optimizer=False`` leaves out the optimizer and
    scheduler (for branches that never step them)."""

    def __init__(self, state: TrainState, optimizer: bool = True):
        self.state = state
        self.params = [p.detach().clone() for p in state.params]
        self.opt = unwrap_optimizer(state.optimizer)
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
            self.sched = copy.deepcopy(state.scheduler.state_dict())
        self.rng = rng_state()
        self.scaler = state.scaler.state_dict() if state.scaler is not None else None
        self.sampler = copy.deepcopy(state.sampler.state_dict())
        self.repeat = state.sampler.repeat.copy()

    @torch.no_grad()
    def restore(self) -> None:
        state = self.state
        for p, saved in zip(state.params, self.params):
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
            state.scheduler.load_state_dict(copy.deepcopy(self.sched))
        _drop_gathered(state.model)
        set_rng_state(self.rng)
        if self.scaler is not None:  # fp16: a branch's overflows must not change the scale
            state.scaler.load_state_dict(self.scaler)
        state.sampler.repeat = self.repeat.copy()
        state.sampler.load_state_dict(copy.deepcopy(self.sampler))


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


def unwrap_optimizer(optimizer):
    """The torch optimizer behind accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
