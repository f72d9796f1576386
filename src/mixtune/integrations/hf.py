"""MixtureCallback: mixtune's mixers inside a Hugging Face ``Trainer`` / TRL ``SFTTrainer``.

Usage (see docs/integrations.md and examples/hf_trainer_mixture.py)::

    mix = MixtureDataset({"math": math_examples, "chat": chat_examples}, seed=0, pad_token_id=0)
    cb = MixtureCallback(mix, "dynamixsft", {"update_every": 50})
    trainer = Trainer(model, TrainingArguments(..., max_steps=1000), train_dataset=mix,
                      data_collator=mix.collate, callbacks=[cb])
    trainer.train()   # weights in trainer.state.log_history under "mixtune/weight/<name>"

What the callback does, at the steps the mixer asks for (``update_steps``):

1. builds a :class:`MixContext` from what a Trainer can supply: per-dataset training losses
   (:class:`~mixtune.integrations.ledger.LossLedger`, a forward hook crediting each training
   micro-batch's token losses to the dataset of every row), and the one-step look-ahead
   (:func:`mixtune.engine.probe.lookahead` on a :class:`~mixtune.engine.state.TrainState` of
   the Trainer's model, optimizer and LR scheduler, restored bit-identically afterwards);
2. calls ``mixer.propose`` and appends the weights to the mixture's schedule;
3. logs weights and the mixer's diagnostics to ``state.log_history`` (and ``metrics_path``).

Deliberate differences from ``mixtune train`` (numbered):

1. Weights proposed after step s take effect at step s + 2, not s + 1: accelerate's data loader
   reads one batch ahead, so batch s + 1 is already drawn when the step-s callback runs.
2. No per-domain evaluation, probing or gradient alignment (``ctx.evaluate``/``probe``): the
   mixers that need them (dynamics, proxymix) raise an error pointing to ``mixtune train``.
3. The loss ledger assumes one model forward per training micro-batch and an unpacked batch
   (no TRL packing / padding-free), and labels passed to the model
   (:mod:`mixtune.integrations.ledger`).
"""

from __future__ import annotations

import contextlib
import json
import os
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from transformers import TrainerCallback

from mixtune import registry
from mixtune.data.sampler import MixtureSampler
from mixtune.engine import probe
from mixtune.engine.snapshot import unwrap_optimizer
from mixtune.engine.state import TrainState
from mixtune.errors import ConfigError, MixtuneError
from mixtune.integrations.dataset import MixtureDataset
from mixtune.integrations.ledger import LossLedger
from mixtune.mixers import MixContext
from mixtune.registry import MIXERS
from mixtune.schema import MethodConfig
from mixtune.simplex import validate

LACKS = {
    "evaluate": "a HF Trainer callback has no per-domain evaluation during training; "
    "use `mixtune train`",
    "probe": "a HF Trainer callback cannot run branch training runs; use `mixtune train`",
}
"""What this adapter cannot give a mixer (registry capabilities), and why."""
STATE_FILE = "mixtune_mixture.json"


class _Acc:
    """The accelerator calls the look-ahead makes (:mod:`mixtune.engine.probe`), for a model
    the Trainer already placed."""

    def __init__(self, device, args, world: int):
        self.device, self.world = device, world
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        self._autocast = (
            partial(torch.autocast, device.type, dtype=dtype) if dtype else contextlib.nullcontext
        )
        self.params: list = []

    def autocast(self):
        return self._autocast()

    def backward(self, loss):
        loss.backward()
        if self.world > 1:  # what DDP does: average the ranks' gradients
            for p in self.params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world

    def gather(self, x):
        if self.world == 1:
            return x
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x)
        return torch.cat(out)


def _unsupported(what: str):
    def call(*args, **kwargs):
        raise MixtuneError(
            f"ctx.{what} is not available under HF Trainer (it needs mixtune's "
            "own loop); use `mixtune train` for this mixer"
        )

    return call


class MixtureCallback(TrainerCallback):
    """Runs a mixtune mixer on a :class:`MixtureDataset` during ``Trainer.train``.

    Args:
        mixture: the Trainer's ``train_dataset`` (or the source of ``as_hf_dataset()``).
        mixer: a registered name (``uniform``, ``proportional``, ``temperature``, ``fixed``,
            ``exp3``, ``dynamixsft``) or a mixer instance following mixtune's protocol.
        options: the mixer's options, as in a mixtune config's ``mixer:`` section.
        metrics_path: optional JSONL file; one record per mixer update (main process only).
        track_losses: record per-dataset training losses (a token cross-entropy over each
            training micro-batch's logits). Default: for mixers that use them (exp3, and any
            mixer given as an instance).
        resume_from: checkpoint directory to restore from; default
            ``<output_dir>/checkpoint-<step>`` when the Trainer resumes.
    """

    def __init__(
        self,
        mixture: MixtureDataset,
        mixer="uniform",
        options: dict | None = None,
        metrics_path: str | None = None,
        track_losses: bool | None = None,
        resume_from: str | None = None,
    ):
        self.mix = mixture
        if isinstance(mixer, str):
            cfgm = MethodConfig(mixer, dict(options or {}))
            registry.check(registry.requirements(MIXERS.get_class(mixer, "mixer")), LACKS)
            opts = MIXERS.options(cfgm, "mixer")
            needs = registry.requirements(MIXERS[mixer], opts)
            registry.check(needs, LACKS)
            self.mixer = MIXERS[mixer](opts, mixture.infos, [], mixture.seed)
            self.name = mixer
        else:
            if options:
                raise ConfigError("options: only for a mixer given by name")
            self.mixer, self.name = mixer, type(mixer).__name__.lower()
        if track_losses is None:  # a mixer given as an instance may read ctx.train_losses
            track_losses = not isinstance(mixer, str) or "train_losses" in needs
        self.track = bool(track_losses)
        self.metrics_path, self.resume_from = metrics_path, resume_from
        self.ledger = LossLedger(mixture)
        self.seen = np.zeros(len(mixture.names), np.int64)  # examples trained on, per dataset
        self.train_state: TrainState | None = None  # what the look-ahead reads, once training

    # ------------------------------------------------------------------------------------------
    def on_train_begin(
        self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs
    ):
        if args.dataloader_num_workers:
            raise ConfigError("dataloader_num_workers: must be 0 with a MixtureDataset")
        world, micro, ga = (
            args.world_size,
            args.per_device_train_batch_size,
            args.gradient_accumulation_steps,
        )
        self.mix.start(micro * ga * world)
        acc = _Acc(next(model.parameters()).device, args, world)
        params = [p for p in model.parameters() if p.requires_grad]
        acc.params = params
        # What the look-ahead reads of mixtune's run, from the HF Trainer's.
        self.train_state = TrainState(
            acc=acc,
            model=model,
            params=params,
            optimizer=unwrap_optimizer(optimizer),
            scheduler=lr_scheduler,
            sampler=_look_sampler(self.mix),
            train_sets=self.mix.parts,
            world=world,
            rank=args.process_index,
            micro=micro,
            batch_size=micro * ga * world,
            max_steps=state.max_steps,
            seed=self.mix.seed,
            pad_token_id=self.mix.pad_token_id,
            step=state.global_step,
        )
        self.updates = self.mixer.update_steps(state.max_steps)
        if self.track:
            self.ledger.attach(model, state.global_step, micro, ga, world, args.process_index)
        if state.global_step > 0:
            self._load(args, state)
        else:
            self._update(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        s = state.global_step
        ds, _ = self.mix.batch(s - 1)
        self.seen += np.bincount(ds, minlength=len(self.seen))
        if s in self.updates and s < state.max_steps:
            self._update(args, state)

    def on_save(self, args, state, control, **kwargs):
        self.ledger.pull()  # every rank: it may all-reduce
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(path):
            blob = {
                "mixer": self.mixer.state_dict(),
                "mixture": self.mix.state_dict(),
                "sums": self.ledger.sums.tolist(),
                "seen": self.seen.tolist(),
                "step": state.global_step,
            }
            tmp = os.path.join(path, STATE_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump(blob, f, default=_plain)
            os.replace(tmp, os.path.join(path, STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        self.ledger.detach()

    # ------------------------------------------------------------------------------------------
    def _update(self, args, state) -> None:
        s, ts = state.global_step, self.train_state
        ts.step = s
        diag: dict = {}
        losses = self.ledger.take()
        ctx = MixContext(
            step=s,
            max_steps=state.max_steps,
            datasets=self.mix.infos,
            domains=[],
            weights=self.mix.weights.copy(),
            train_losses=losses,
            evaluate=_unsupported("evaluate"),
            probe=_unsupported("probe"),
            lookahead=partial(probe.lookahead, ts),
            log=diag.__setitem__,
            losses=partial(probe.example_losses, ts),
        )
        self.ledger.paused = True  # look-ahead forwards are not training micro-batches
        try:
            w = validate(self.mixer.propose(ctx), self.mix.names, what=f"mixer '{self.name}'")
        finally:
            self.ledger.paused = False
        self.mix.set_weights(w, 0 if s == 0 else s + 1)
        names = self.mix.names
        rec = {f"mixtune/weight/{n}": float(x) for n, x in zip(names, w)}
        rec.update({f"mixtune/train_loss/{n}": v for n, v in losses.items()})
        rec.update({f"mixtune/seen/{n}": int(c) for n, c in zip(names, self.seen)})
        for key, value in diag.items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in items:
                if isinstance(v, (int, float, np.floating, np.integer)):
                    rec[f"mixtune/{key}" + (f"/{sub}" if sub else "")] = float(v)
        state.log_history.append({**rec, "step": s})
        if self.metrics_path and state.is_world_process_zero:
            line = {
                "step": s,
                "weights": dict(zip(names, w.tolist())),
                "train_losses": losses,
                "seen": dict(zip(names, self.seen.tolist())),
                "mixer": diag,
            }
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(line, default=_plain) + "\n")

    def _load(self, args, state) -> None:
        path = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        file = os.path.join(path, STATE_FILE)
        if not os.path.isfile(file):
            raise MixtuneError(
                f"MixtureCallback: no mixture state at {file}; pass "
                "MixtureCallback(resume_from=<checkpoint dir>)"
            )
        with open(file) as f:
            blob = json.load(f)
        if blob["step"] != state.global_step:
            raise MixtuneError(
                f"MixtureCallback: {file} is for step {blob['step']}, the Trainer "
                f"resumes at step {state.global_step}"
            )
        self.mixer.load_state_dict(blob["mixer"])
        self.mix.load_state_dict(blob["mixture"])
        self.ledger.sums = np.asarray(blob["sums"], np.float64)
        self.seen = np.asarray(blob["seen"], np.int64)


def _look_sampler(mix: MixtureDataset) -> MixtureSampler:
    """A sampler for look-ahead draws (``draw_from`` is keyed, so it never moves the stream)."""
    return MixtureSampler(mix.sizes, mix.names, mix.schedule[0][1], mix.seed)


def _plain(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
