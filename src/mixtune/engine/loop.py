"""THE training loop: one optimizer step at a time, on accelerate.

Per step: the sampler draws a global batch with the current weights; this rank processes its
shard in micro-batches (forward, per-token loss, one reduction normalised by the step's global
token count, backward); gradients are clipped and checked; the optimizer steps. After the step:
log training losses, evaluate every domain when due, ask the mixer for new weights at its
update steps, write the metrics record, checkpoint when due.

Everything a step sees is determined by (seed, step, weight history), so a resumed run repeats
an uninterrupted one exactly.

The loop calls a loss's hooks (:class:`mixtune.losses.base.Loss`) and a mixer's
(:class:`mixtune.mixers.base.Mixer`) directly. What the step, branch runs and loss hooks may
read of the run is one :class:`~mixtune.engine.state.TrainState` (:attr:`Trainer.state`).
The step itself is in :mod:`mixtune.engine.step`, the bookkeeping in
:mod:`mixtune.engine.metrics`, the evaluations in :mod:`mixtune.engine.evaluation`, the run's
answer (what ``final/`` holds) in :mod:`mixtune.engine.answer`. What is left here (about 425
lines) is kept whole on purpose: building the run, its control flow and the points where it
calls each component read best as one class, top to bottom.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from mixtune import config as config_mod
from mixtune.config import RunConfig
from mixtune.data import streaming
from mixtune.data.sampler import MixtureSampler, SamplerExhausted
from mixtune.data.tokenize import resolve_template
from mixtune.engine import (
    build,
    checkpoint,
    fingerprint,
    integrity,
    lock,
    precision,
    probe,
    safewrite,
)
from mixtune.engine.answer import Answer
from mixtune.engine.evaluation import Evaluator
from mixtune.engine.metrics import Metrics, data_summary
from mixtune.engine.process import (  # noqa: F401  (re-exported)
    Interrupted,
    catch_signals,
    check_writable,
    flat,
    local,
    make_accelerator,
    progress,
    seed_everything,
    shard_fsdp2,
    whole,
)
from mixtune.engine.rundir import RunDir
from mixtune.engine.state import TrainState
from mixtune.engine.step import StepStats, check_finite_params, optimizer_step
from mixtune.errors import ConfigError
from mixtune.losses import logits
from mixtune.mixers import DatasetInfo, DomainInfo, MixContext
from mixtune.registry import LOSSES, MIXERS, build_method
from mixtune.simplex import validate

log = logging.getLogger(__name__)


class Trainer:
    """Builds everything from a :class:`RunConfig` (validating before touching the run dir).

    :attr:`state` is the :class:`~mixtune.engine.state.TrainState` handed to the step, branch
    runs and the loss's hooks; :attr:`step` lives there.
    """

    def __init__(self, cfg: RunConfig, accelerator=None, writer: bool = True):
        """``writer``: this trainer will train into ``cfg.output_dir``, so it takes the run
        directory's lock now (engine/lock.py), before anything reads or writes the directory:
        a second writer stops here, having read nothing. ``writer=False`` (evaluation only:
        ``mixtune eval``, base-model references) takes no lock and reads nothing there."""
        self.acc = accelerator or make_accelerator(cfg)
        # _lock: the lock object (main process only; None on the other ranks); _locked: whether
        # this trainer holds it, on every rank alike (taking it again is a collective).
        self.writer, self._lock, self._locked = writer, None, False
        if writer:
            check_writable(Path(cfg.output_dir))  # (the lock creates the directory)
            self._lock, self._locked = lock.take(Path(cfg.output_dir), self.acc), True
        try:
            self._build(cfg)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory's lock (idempotent; :meth:`run` does it when it ends)."""
        if self._lock is not None:
            self._lock.release()
        self._lock, self._locked = None, False

    def _build(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        seed_everything(cfg.seed)
        tc = cfg.train
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.micro = tc.micro_batch_size or max(1, tc.batch_size // self.world)
        if tc.micro_batch_tokens is not None and tc.batch_size % self.world:
            raise ConfigError(  # micro-batches filled by tokens from equal shares (step.py)
                f"train.batch_size={tc.batch_size} must be a multiple of the processes "
                f"({self.world}) with train.micro_batch_tokens"
            )
        if tc.micro_batch_tokens is None and tc.batch_size % (self.micro * self.world):
            raise ConfigError(
                f"train.batch_size={tc.batch_size} must be a multiple of micro_batch_size "
                f"({self.micro}) x processes ({self.world})"
            )

        # Inputs first: any bad config, data or model fails here, before the run dir is touched.
        self.tokenizer = build.load_tokenizer(cfg.model)
        # (streaming datasets are read lazily: mixtune.data.streaming)
        self.train_sets, self.all_domains = streaming.build(cfg, self.tokenizer)
        # train.epochs becomes max_steps now that the dataset sizes are known
        cfg = self.cfg = config_mod.resolve_epochs(cfg, [t.size for t in self.train_sets])
        # What mixers, probes and checkpoint selection see: every domain but the test splits
        # (role: test), which only the scheduled evaluations measure and log.
        self.domains = [d for d in self.all_domains if d.role != "test"]
        self.names = [t.name for t in self.train_sets]
        self.infos = [
            DatasetInfo(t.name, t.size, int(t.label_counts.sum())) for t in self.train_sets
        ]
        self.dom_infos = [DomainInfo(d.name, d.role, d.metric, d.reference) for d in self.domains]
        self.mixer = build_method(MIXERS, cfg.mixer, "mixer", self.infos, self.dom_infos, cfg.seed)
        self.loss_fn = build_method(LOSSES, cfg.loss, "loss")
        self.sampler = MixtureSampler(
            [t.size for t in self.train_sets],
            self.names,
            np.full(len(self.names), 1 / len(self.names)),
            cfg.seed,
            [t.repeat for t in self.train_sets],
            streaming.streams_of(self.train_sets),
        )
        self.rundir = RunDir(cfg.output_dir)
        # A reader never trains: nothing of the run directory is read for a resume.
        self.resume_from = self.rundir.resume_point(cfg.resume) if self.writer else None
        if self.resume_from is not None:  # an explicit resume=<dir> may be damaged
            integrity.verify(self.resume_from)

        dtype = build.pick_dtype(cfg.model.dtype, frozen=cfg.model.lora.enabled)
        model = build.load_model(cfg.model, self.tokenizer, cfg.seed, dtype)
        try:  # before anything is written: an impossible train.logits=chunked is a config error
            logits.configure(model, tc.logits, tc.logits_chunk, sharded=tc.fsdp and self.world > 1)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # train.packing=auto resolved (engine/build.py); the run records the resolved value.
        packing, why = build.resolve_packing(cfg, model)
        if why:
            log.info("train.packing=auto: padded rows, because %s", why)
        log.info(
            "attention: %s, %s rows",
            getattr(model.config, "_attn_implementation", None) or "default",
            "packed" if packing else "padded",
        )
        cfg = self.cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, packing=packing)
        )
        tc = cfg.train
        # The last check before the run dir is written: what this start trains with against the
        # run's record (run.json); a resume may only amend what cannot change the trajectory.
        self.fingerprint, self.amendments = None, []
        if self.writer:
            self.fingerprint = fingerprint.of_run(
                cfg, self.tokenizer, self.train_sets, self.all_domains
            )
            self.amendments = self.rundir.check_resume(cfg, self.fingerprint, self.resume_from)
        if tc.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.optimizer = build.make_optimizer(model, tc)
        self.scheduler = build.make_scheduler(self.optimizer, tc, cfg.max_steps)
        if tc.fsdp and self.world > 1:
            self.model, self.optimizer = shard_fsdp2(model.to(self.acc.device), self.optimizer)
        else:
            if tc.fsdp:
                log.warning("train.fsdp: a single process has nothing to shard; not sharding")
            self.model, self.optimizer = self.acc.prepare(model, self.optimizer)
        self.model.train()
        self.params = [p for _, p in build.trainable(self.model)]
        self.scaler = precision.setup(self.acc, tc.mixed_precision)  # fp16 only
        # Membership tests only (never iterated): max_steps may be huge (mixers.base.Steps).
        self.updates = self.mixer.update_steps(cfg.max_steps)
        # Sequence lengths as flat arrays, for per-step token counts without a sync.
        self._lengths = [streaming.lengths(t) for t in self.train_sets]

        self.state = TrainState(
            acc=self.acc,
            model=self.model,
            params=self.params,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            sampler=self.sampler,
            train_sets=self.train_sets,
            world=self.world,
            rank=self.rank,
            micro=self.micro,
            batch_size=tc.batch_size,
            max_steps=cfg.max_steps,
            seed=cfg.seed,
            pad_token_id=self.tokenizer.pad_token_id,
            domains=self.domains,
            tokenizer=self.tokenizer,
            model_config=cfg.model,
            max_length=tc.max_length,
            run_dir=self.rundir.path,
            # Looked up at each call, so a wrapped train_step / evaluate sees branches too.
            train_step=lambda ds, ex: self.train_step(ds, ex),
            evaluate=lambda *args, **kwargs: self.evaluate(*args, **kwargs),
            replace_example=self.replace_example,
            scaler=self.scaler,
        )
        self.metrics = Metrics(self.train_sets, self._lengths, self.acc, self.rundir, cfg)
        self.evaluator = Evaluator(
            self.model,
            self.acc,
            self.tokenizer,
            self.all_domains,
            self.domains,
            pack_rows=tc.max_length if tc.packing else None,
        )
        # The run's answer (final/): the evaluations so far and the weights it may need.
        self.answer = Answer(
            self.rundir,
            self.dom_infos,
            [DomainInfo(d.name, d.role, d.metric, d.reference) for d in self.all_domains],
            tc.final_model,
            self.acc,
            keep_all=tc.keep_evaluated == "all",
        )
        self.stop_signal: int | None = None

    @property
    def step(self) -> int:
        """Completed optimizer steps (kept in :attr:`state`, where branch runs read it)."""
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def counters(self) -> dict:
        return self.metrics.counters

    @property
    def record(self) -> dict:
        """What has been logged at the step in progress (written by the next flush)."""
        return self.metrics.record

    @property
    def eval_cache(self) -> dict | None:
        return self.evaluator.cache

    # ------------------------------------------------------------------------------------------
    def train_step(self, ds: np.ndarray, ex: np.ndarray) -> StepStats:
        """One optimizer step on the global batch ``(ds, ex)``; this rank does its shard."""
        return optimizer_step(self.state, self.loss_fn, ds, ex, self.cfg.train)

    def replace_example(self, k: int, e: int, input_ids: np.ndarray, labels: np.ndarray) -> None:
        """Swap training example ``e`` of dataset ``k`` (keeps the loop's token counts right)."""
        data = self.train_sets[k].data
        data.input_ids[e], data.labels[e] = input_ids, labels
        self.train_sets[k].label_counts[e] = int((labels[1:] != -100).sum())
        self._lengths[k][e] = len(input_ids)

    def evaluate(
        self,
        n_batches: int | None = None,
        accuracy: bool = True,
        use_cache: bool = True,
        per_example: bool = False,
        include_test: bool = False,
    ) -> dict[str, dict]:
        """Metrics of every domain now over its first ``n_batches`` batches, recycled from
        this step's scheduled evaluation when it covers them (:meth:`Evaluator.evaluate`)."""
        return self.evaluator.evaluate(
            self.step, n_batches, accuracy, use_cache, per_example, include_test
        )

    # ------------------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> dict:
        """Train to ``max_steps`` (or checkpoint and return after step ``stop_after``); the
        run directory's lock, taken when this trainer was built, is released when it ends."""
        if not self.writer:
            raise ValueError("Trainer(writer=False) evaluates only; build a writer to train")
        if not self._locked:  # released by an earlier run(): one writer again
            self._lock, self._locked = lock.take(self.rundir.path, self.acc), True
        try:
            return self._start(stop_after)
        finally:
            self.close()

    def _start(self, stop_after: int | None) -> dict:
        cfg = self.cfg
        if self.resume_from is not None:
            saved, rank_saved = checkpoint.load(
                self.resume_from,
                accelerator=self.acc,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                sampler=self.sampler,
                mixer=self.mixer,
                loss=self.loss_fn,
            )
            self.step = saved["step"]
            self.metrics.load_state_dict(saved, rank_saved)
            self.evaluator.load_state_dict(saved)
            if self.scaler is not None:
                self.scaler.load_state_dict(saved)
            source = self.resume_from.resolve().parent.parent
            self.answer.load_state_dict(saved, self.step, source)
            # Before the first resumed step: what the loss restored may change the training
            # data that step draws.
            self.loss_fn.on_resume(self.state)
        if self.acc.is_main_process:
            resume_step = None if self.resume_from is None else self.step
            if resume_step is not None and self.rundir.adopt(self.resume_from, resume_step):
                # Branching: a checkpoint of another run continued into this new directory.
                self.answer.adopt(self.resume_from.resolve().parent.parent)
            self.rundir.start(cfg, resume_step, self.fingerprint, self.amendments)
            self.rundir.write_json("data.json", data_summary(self.train_sets, self.all_domains))
        self.acc.wait_for_everyone()
        if cfg.report_to:
            self.acc.init_trackers("mixtune", config=flat(config_mod.to_dict(cfg)))
        if self.resume_from is None:
            log.info("training %s for %d steps", self.names, cfg.max_steps)
        else:
            log.info("resuming from %s at step %d", self.resume_from, self.step)

        with catch_signals(self):
            return self._run(stop_after)

    def _run(self, stop_after: int | None) -> dict:
        cfg, tc = self.cfg, self.cfg.train
        t_start, base_elapsed = time.perf_counter(), self.counters["elapsed"]
        bar = progress(cfg, self.step, self.acc.is_main_process)
        if self.resume_from is None:  # step 0: evaluate the base model and take the first weights
            self._eval_if_due(force=True)
            self._update_mixer()
            self._flush(t_start, base_elapsed)
        while self.step < cfg.max_steps:
            try:
                ds, ex = self.sampler.next_batch(tc.batch_size)
            except SamplerExhausted as e:
                log.warning("stopping early at step %d: %s", self.step, e)
                break
            stats = self.train_step(ds, ex)
            self.step += 1
            self._count(ds, ex, stats)
            self.loss_fn.after_step(self.state)  # the loss commits (and acts on) this step
            last = self.step == cfg.max_steps
            if self.step % tc.log_every == 0 or last:
                self._log_train(bar, t_start, base_elapsed)
            self._eval_if_due(force=last)
            if not last:
                self._update_mixer()
            self._flush(t_start, base_elapsed)
            bar.update(1)
            signum = self._signalled()
            stop = (stop_after is not None and self.step >= stop_after) or signum is not None
            if (tc.save_every and self.step % tc.save_every == 0) or last or stop:
                self._save(t_start, base_elapsed)
            if signum is not None and not last:
                bar.close()
                name = signal.Signals(signum).name
                raise Interrupted(
                    f"stopped by {name} after step {self.step}; checkpoint saved in "
                    f"{self.rundir.checkpoints}; run the same command again to resume",
                    signum,
                )
            if stop and not last:
                bar.close()
                return {"steps": self.step, "stopped": True, "output_dir": str(self.rundir.path)}
        bar.close()
        summary = self._finish(t_start, base_elapsed)
        if cfg.report_to:
            self.acc.end_training()
        return summary

    # ------------------------------------------------------------------------------------------
    def _signalled(self) -> int | None:
        """The stop signal if any rank got one (all ranks must stop at the same step)."""
        if self.world == 1:
            return self.stop_signal
        flag = torch.tensor([self.stop_signal or 0], device=self.acc.device)
        return int(self.acc.gather(flag).max().item()) or None  # a sync point, once per step

    def _count(self, ds: np.ndarray, ex: np.ndarray, stats: StepStats) -> None:
        self.metrics.count(self.step, ds, ex, stats)

    def _log_train(self, bar, t_start: float, base_elapsed: float) -> None:
        loss = self.metrics.log_train()
        diagnostics = self.loss_fn.diagnostics(self.state)  # may all-reduce: every rank
        if diagnostics:
            self.record["loss"] = diagnostics
        elapsed = base_elapsed + time.perf_counter() - t_start
        tps = self.counters["input_tokens"] / max(elapsed, 1e-9)
        w = " ".join(f"{n[:8]}={x:.2f}" for n, x in zip(self.names, self.sampler.weights))
        bar.set_postfix_str(f"loss={loss:.3f} tok/s={tps:,.0f} w[{w}]", refresh=False)

    def _eval_if_due(self, force: bool = False) -> None:
        every = self.cfg.train.eval_every
        if not self.all_domains or not (force or (every and self.step % every == 0)):
            return
        self.record["eval"] = self.evaluator.scheduled(self.step)
        self.answer.observe(self.step, self.record["eval"], self.model)

    def _update_mixer(self) -> None:
        if self.step != 0 and self.step not in self.updates:
            return
        diagnostics: dict = {}
        ctx = MixContext(
            step=self.step,
            max_steps=self.cfg.max_steps,
            datasets=self.infos,
            domains=self.dom_infos,
            weights=self.sampler.weights.copy(),
            train_losses=self.metrics.train_losses("mix"),
            evaluate=self.evaluate,
            probe=partial(probe.probe, self.state),
            lookahead=partial(probe.lookahead, self.state),
            log=diagnostics.__setitem__,
            losses=partial(probe.example_losses, self.state),
            grad_alignment=partial(probe.grad_alignment, self.state),
        )
        weights = validate(
            self.mixer.propose(ctx), self.names, what=f"mixer '{self.cfg.mixer.name}'"
        )
        self.sampler.set_weights(weights)
        if diagnostics:
            self.record["mixer"] = diagnostics

    def _flush(self, t_start: float, base_elapsed: float) -> None:
        """Write this step's metrics record, if anything was logged at this step."""
        lr = self.scheduler.get_last_lr()[0]
        elapsed = base_elapsed + time.perf_counter() - t_start
        self.metrics.flush(self.step, lr, self.sampler.weights, elapsed)

    def _save(self, t_start: float, base_elapsed: float) -> None:
        check_finite_params(self.state, self.cfg.train)  # never over a good checkpoint
        self.counters["elapsed"] = base_elapsed + time.perf_counter() - t_start
        # A disk that refuses the write, however torch or safetensors say so: one line, and
        # the half-written directory gone (engine/safewrite.py).
        root, step = self.rundir.checkpoints, self.step
        tmp = root / f".tmp-{checkpoint.PREFIX}{step:06d}"
        with safewrite.writing(f"checkpoint step {step}", root, self.rundir.path, cleanup=tmp):
            self._save_checkpoint()
        if self.acc.is_main_process:
            self.answer.prune()

    def _save_checkpoint(self) -> None:
        checkpoint.save(
            self.rundir.checkpoints,
            self.step,
            accelerator=self.acc,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            sampler=self.sampler,
            mixer=self.mixer,
            loss=self.loss_fn,
            keep=self.cfg.train.keep_checkpoints,
            state={
                **self.metrics.state_dict(),
                **self.evaluator.state_dict(),
                **self.answer.state_dict(),
                **(self.scaler.state_dict() if self.scaler is not None else {}),
            },
            rank_state=self.metrics.rank_state_dict(),
        )

    def _finish(self, t_start: float, base_elapsed: float) -> dict:
        elapsed = base_elapsed + time.perf_counter() - t_start
        final_eval = (self.eval_cache or {}).get("result")
        summary = self.metrics.summary(
            self.step, elapsed, final_eval, self.sampler.weights, resumed=base_elapsed
        )
        model = self.acc.unwrap_model(self.model)
        # FSDP2 shards: every rank takes part in the gather, rank 0 keeps the full tensors
        full = checkpoint.full_state_dict(model, keep=self.acc.is_main_process)
        cfg_model = self.cfg.model
        if self.acc.is_main_process:
            # final/: the run's answer (engine/answer.py), said in the log
            self.tokenizer.chat_template = resolve_template(
                self.tokenizer, cfg_model.chat_template, quiet=True
            )
            best, selection = self.answer.finish(
                model, self.tokenizer, full, self.step, build.base_reference(cfg_model)
            )
            if best is not None:  # the best evaluated step with every constraint kept
                summary["best_feasible"] = best
            if selection is not None:
                summary["selection"] = selection
            self.answer.prune()
            self.rundir.write_json("summary.json", summary)
        self.acc.wait_for_everyone()
        return summary


def train(cfg: RunConfig) -> dict:
    """Build a :class:`Trainer` from ``cfg`` and run it; returns the run summary."""
    return Trainer(cfg).run()
