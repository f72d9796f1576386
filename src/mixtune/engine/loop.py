"""THE training loop: one optimizer step at a time, on accelerate.

Per step: the sampler draws a global batch with the current weights; this rank processes its
shard in micro-batches (forward, per-token loss, one reduction normalised by the step's global
token count, backward); gradients are clipped and checked; the optimizer steps. After the step:
log training losses, evaluate every domain when due, ask the mixer for new weights at its
update steps, write the metrics record, checkpoint when due.

Everything a step sees is determined by (seed, step, weight history), so a resumed run repeats
an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from mixtune import config as config_mod
from mixtune.config import RunConfig
from mixtune.data import streaming
from mixtune.data.collate import collate
from mixtune.data.sampler import MixtureSampler, SamplerExhausted, shard
from mixtune.engine import checkpoint, probe, setup
from mixtune.engine.rundir import RunDir
from mixtune.engine.runtime import (  # noqa: F401  (re-exported)
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
from mixtune.errors import ConfigError, TrainingError
from mixtune.eval.constraints import best_feasible_for_run
from mixtune.eval.domains import Scores, evaluate_examples, first_batches, loss_se, summarize
from mixtune.losses.core import reduce
from mixtune.mixers import DatasetInfo, DomainInfo, MixContext
from mixtune.registry import LOSSES, MIXERS, build_method
from mixtune.simplex import validate

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    per_dataset: torch.Tensor  # (K, 2): NLL sum and supervised tokens per dataset, this rank
    grad_norm: torch.Tensor  # () global gradient norm before clipping
    skipped: bool = False  # non-finite, update dropped (train.nonfinite=skip)


class Trainer:
    """Builds everything from a :class:`RunConfig` (validating before touching the run dir)."""

    def __init__(self, cfg: RunConfig, accelerator=None):
        self.cfg = cfg
        self.acc = accelerator or make_accelerator(cfg)
        self.started = False
        seed_everything(cfg.seed)
        tc = cfg.train
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.micro = tc.micro_batch_size or max(1, tc.batch_size // self.world)
        if tc.batch_size % (self.micro * self.world):
            raise ConfigError(
                f"train.batch_size={tc.batch_size} must be a multiple of micro_batch_size "
                f"({self.micro}) x processes ({self.world})"
            )

        # Inputs first: any bad config, data or model fails here, before the run dir is touched.
        self.tokenizer = setup.load_tokenizer(cfg.model)
        # (streaming datasets are read lazily: mixtune.data.streaming)
        self.train_sets, self.all_domains = streaming.build(cfg, self.tokenizer)
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
        check_writable(self.rundir.path)
        self.resume_from = self.rundir.resume_point(cfg.resume)
        if self.resume_from is not None:
            self.rundir.check_compatible(cfg)

        dtype = setup.pick_dtype(cfg.model.dtype)
        model = setup.load_model(cfg.model, self.tokenizer, cfg.seed, dtype)
        if tc.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.optimizer = setup.make_optimizer(model, tc)
        self.scheduler = setup.make_scheduler(self.optimizer, tc, cfg.max_steps)
        if tc.fsdp and self.world > 1:
            self.model, self.optimizer = shard_fsdp2(model.to(self.acc.device), self.optimizer)
        else:
            if tc.fsdp:
                log.warning("train.fsdp: a single process has nothing to shard; not sharding")
            self.model, self.optimizer = self.acc.prepare(model, self.optimizer)
        self.model.train()
        self.params = [p for _, p in setup.trainable(self.model)]
        # Membership tests only (never iterated): max_steps may be huge (mixers.base.Steps).
        self.updates = self.mixer.update_steps(cfg.max_steps)
        # Lengths and label counts as flat arrays, for per-step token counts without a sync.
        self._labels = [t.label_counts for t in self.train_sets]
        self._lengths = [streaming.lengths(t) for t in self.train_sets]

        self.step = 0
        self.counters = {
            "tokens": 0,
            "input_tokens": 0,
            "examples": 0,
            "elapsed": 0.0,
            "drawn": [0] * len(self.names),
            "skipped_nonfinite": 0,
            "nonfinite_streak": 0,
        }
        self.stop_signal: int | None = None
        K = len(self.names)
        self.sums = {
            "log": torch.zeros(K, 2, dtype=torch.float64, device=self.acc.device),
            "mix": torch.zeros(K, 2, dtype=torch.float64, device=self.acc.device),
            "gn": torch.zeros(4, dtype=torch.float64, device=self.acc.device),
        }
        self.eval_cache: dict | None = None
        self.base_scores: dict | None = None  # step 0's per-example scores (JSON form)
        self.record: dict = {}

    # ------------------------------------------------------------------------------------------
    def train_step(self, ds: np.ndarray, ex: np.ndarray) -> StepStats:
        """One optimizer step on the global batch ``(ds, ex)``; this rank does its shard."""
        K, device = len(self.names), self.acc.device
        # Global supervised-token count: every rank knows the whole batch, so no all-reduce.
        n_tokens = float(sum(self._labels[k][e] for k, e in zip(ds, ex)))
        stats = torch.zeros(K, 2, dtype=torch.float64, device=device)
        batches = []
        for sl in shard(len(ds), self.world, self.rank, self.micro):
            d, e = ds[sl], ex[sl]
            batch = collate(
                [self.train_sets[k].data.input_ids[j] for k, j in zip(d, e)],
                [self.train_sets[k].data.labels[j] for k, j in zip(d, e)],
                self.tokenizer.pad_token_id,
                d,
            )
            batch["index"] = torch.as_tensor(e, dtype=torch.long)
            batches.append({k: v.to(device) for k, v in batch.items()})
        # A loss may need the whole step first (CADFT z-scores over the global batch).
        prepare = getattr(self.loss_fn, "prepare", None)
        extras = prepare(self, batches) if prepare else [None] * len(batches)
        for i, batch in enumerate(batches):
            # Only the last micro-batch all-reduces gradients.
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last else self.acc.no_sync(self.model)
            with sync, self.acc.autocast():
                logits = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits  # (B, T, V)
                terms = self.loss_fn(logits, batch["labels"], extras[i])
                # DDP averages gradients over ranks; x world turns that into the global sum.
                loss = (
                    reduce(
                        terms.per_token,
                        terms.mask,
                        terms.token_weights,
                        terms.sample_weights,
                        n_tokens,
                    )
                    * self.world
                )
                self.acc.backward(loss)
            seq_nll = (terms.per_token.detach() * terms.mask).sum(-1).double()  # (B,)
            stats[:, 0].index_add_(0, batch["domain"], seq_nll)
            stats[:, 1].index_add_(0, batch["domain"], terms.mask.sum(-1).double())
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        grad_norm = whole(self.acc.clip_grad_norm_(self.params, max_norm))
        # Host sync, once per step: a non-finite gradient must never reach the weights.
        # The norm is global (all ranks agree), so every rank takes the same branch.
        if not torch.isfinite(grad_norm):
            if self.cfg.train.nonfinite == "stop":
                raise TrainingError(
                    f"non-finite loss/gradient at step {self.step + 1} (grad norm "
                    f"{float(grad_norm)}); lower train.lr, enable clipping (train.max_grad_norm),"
                    " check the data, or set train.nonfinite=skip. The last checkpoint is intact."
                )
            self.optimizer.zero_grad(set_to_none=True)  # drop the update: no optimizer,
            return StepStats(stats, grad_norm.detach().double(), skipped=True)  # no scheduler
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(stats, grad_norm.detach().double())

    def replace_example(self, k: int, e: int, input_ids: np.ndarray, labels: np.ndarray) -> None:
        """Swap training example ``e`` of dataset ``k`` (keeps the loop's token counts right)."""
        data = self.train_sets[k].data
        data.input_ids[e], data.labels[e] = input_ids, labels
        count = int((labels[1:] != -100).sum())
        self.train_sets[k].label_counts[e] = count
        self._labels[k][e] = count
        self._lengths[k][e] = len(input_ids)

    def evaluate(
        self,
        n_batches: int | None = None,
        accuracy: bool = True,
        use_cache: bool = True,
        per_example: bool = False,
        include_test: bool = False,
    ) -> dict[str, dict]:
        """Metrics of every domain now (``eval.domains.summarize``) over its first
        ``n_batches`` batches.

        This step's scheduled evaluation is reused when it covers them (evaluation recycling):
        the numbers are computed from its per-example scores on exactly the requested
        batches, so an anchor recycled from a full evaluation and a probe evaluated on
        ``n_batches`` batches see the same examples. ``per_example``: each domain's dict also
        holds its :class:`~mixtune.eval.domains.Scores` under ``"scores"`` (for paired
        differences; not JSON). Test-split domains (role ``test``) only with ``include_test``.
        """
        domains = self.all_domains if include_test else self.domains
        c = self.eval_cache
        scores = None
        if (
            use_cache
            and c is not None
            and c["step"] == self.step
            and c.get("scores")
            and (c["n_batches"] is None or (n_batches is not None and c["n_batches"] >= n_batches))
            and (c["accuracy"] or not accuracy)
            and all(d.name in c["scores"] for d in domains)
        ):
            scores = {d.name: Scores.from_json(c["scores"][d.name]) for d in domains}
            if not accuracy:
                scores = {k: Scores(v.nll, v.tokens) for k, v in scores.items()}
        if scores is None:
            scores = evaluate_examples(
                self.model, self.acc, domains, self.tokenizer, n_batches, accuracy
            )
        scores = {d.name: first_batches(scores[d.name], d, n_batches) for d in domains}
        result = summarize(scores, domains)
        if per_example:
            for d in domains:
                result[d.name]["scores"] = scores[d.name]
        return result

    # ------------------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> dict:
        """Train to ``max_steps`` (or checkpoint and return after step ``stop_after``)."""
        cfg = self.cfg
        state = None
        if self.resume_from is not None:
            state, rank_state = checkpoint.load(
                self.resume_from,
                accelerator=self.acc,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                sampler=self.sampler,
                mixer=self.mixer,
                loss=self.loss_fn,
            )
            self.step = state["step"]
            self.counters = {**self.counters, **state["counters"]}
            self.eval_cache = state.get("eval_cache")
            self.base_scores = state.get("base_scores")
            for key, value in rank_state["sums"].items():
                self.sums[key] = value.to(self.acc.device)
        if self.acc.is_main_process:
            self.rundir.start(cfg, None if state is None else self.step)
            self.rundir.write_json("data.json", self._data_summary())
        self.acc.wait_for_everyone()
        self.started = True
        if cfg.report_to:
            self.acc.init_trackers("mixtune", config=flat(config_mod.to_dict(cfg)))
        if state is None:
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
            after_step = getattr(self.loss_fn, "after_step", None)
            if after_step is not None:  # e.g. CADFT's delayed rewriting of targets
                after_step(self)
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
        c = self.counters
        if stats.skipped:
            c["skipped_nonfinite"] += 1
            c["nonfinite_streak"] += 1
            self.record["skipped_nonfinite"] = c["skipped_nonfinite"]
            log.warning(
                "step %d: non-finite loss/gradient; update skipped (%d so far)",
                self.step,
                c["skipped_nonfinite"],
            )
            if c["nonfinite_streak"] >= self.cfg.train.max_nonfinite:
                raise TrainingError(
                    f"{c['nonfinite_streak']} consecutive non-finite steps up to step "
                    f"{self.step} (train.max_nonfinite={self.cfg.train.max_nonfinite}); lower "
                    "train.lr or check the data. The last checkpoint is intact."
                )
            return
        c["nonfinite_streak"] = 0
        c["examples"] += len(ds)
        c["tokens"] += int(sum(self._labels[k][e] for k, e in zip(ds, ex)))
        c["input_tokens"] += int(sum(self._lengths[k][e] for k, e in zip(ds, ex)))
        drawn = np.bincount(ds, minlength=len(self.names))
        c["drawn"] = [int(a + b) for a, b in zip(c["drawn"], drawn)]
        self.sums["log"] += stats.per_dataset
        self.sums["mix"] += stats.per_dataset
        g = stats.grad_norm
        gn = self.sums["gn"]
        gn[:3] += torch.stack([g, torch.ones_like(g), g * g])
        gn[3] = torch.maximum(gn[3], g)

    def _take_sums(self, key: str) -> np.ndarray:
        """Per-dataset (NLL sum, tokens) since the last call, summed over ranks; resets them."""
        sums = self.sums[key]
        if self.world > 1:
            sums = self.acc.reduce(sums, reduction="sum")
        out = sums.cpu().numpy().copy()  # host sync: only at log and mixer-update steps
        self.sums[key].zero_()
        return out

    def _reduced_losses(self, key: str) -> dict[str, float]:
        sums = self._take_sums(key)
        return {n: float(s / t) for n, (s, t) in zip(self.names, sums) if t > 0}

    def _log_train(self, bar, t_start: float, base_elapsed: float) -> None:
        sums = self._take_sums("log")
        per = {n: float(s / t) for n, (s, t) in zip(self.names, sums) if t > 0}
        total = sums.sum(0)
        gn = self.sums["gn"].cpu().numpy().copy()  # the global norm: equal on every rank
        self.sums["gn"].zero_()
        loss = float(total[0] / max(total[1], 1))
        mean = gn[0] / max(gn[1], 1)
        self.record["train"] = {
            "loss": loss,
            "per_dataset": per,
            "grad_norm": float(mean),
            "grad_norm_std": float(np.sqrt(max(gn[2] / max(gn[1], 1) - mean**2, 0.0))),
            "grad_norm_max": float(gn[3]),
        }
        diagnostics = getattr(self.loss_fn, "diagnostics", None)
        if diagnostics is not None:
            self.record["loss"] = diagnostics(self)
        elapsed = base_elapsed + time.perf_counter() - t_start
        tps = self.counters["input_tokens"] / max(elapsed, 1e-9)
        w = " ".join(f"{n[:8]}={x:.2f}" for n, x in zip(self.names, self.sampler.weights))
        bar.set_postfix_str(f"loss={loss:.3f} tok/s={tps:,.0f} w[{w}]", refresh=False)

    def _eval_if_due(self, force: bool = False) -> None:
        every = self.cfg.train.eval_every
        if not self.all_domains or not (force or (every and self.step % every == 0)):
            return
        scores = evaluate_examples(self.model, self.acc, self.all_domains, self.tokenizer)
        result = summarize(scores, self.all_domains)
        if self.step == 0:
            self.base_scores = {k: v.to_json() for k, v in scores.items()}
        elif self.base_scores:
            # change_se: standard error of (loss now − loss at step 0), paired over the same
            # examples: whether a domain moved by more than its evaluation noise
            for k, v in scores.items():
                if k in self.base_scores:
                    base = Scores.from_json(self.base_scores[k])
                    result[k]["change_se"] = loss_se(v.nll - base.nll, v.tokens)
        self.eval_cache = {
            "step": self.step,
            "n_batches": None,
            "accuracy": True,
            "result": result,
            "scores": {k: v.to_json() for k, v in scores.items()},
        }
        self.record["eval"] = result

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
            train_losses=self._reduced_losses("mix"),
            evaluate=self.evaluate,
            probe=partial(probe.probe, self),
            lookahead=partial(probe.lookahead, self),
            log=diagnostics.__setitem__,
            losses=partial(probe.example_losses, self),
            grad_alignment=partial(probe.grad_alignment, self),
        )
        weights = validate(
            self.mixer.propose(ctx), self.names, what=f"mixer '{self.cfg.mixer.name}'"
        )
        self.sampler.set_weights(weights)
        if diagnostics:
            self.record["mixer"] = diagnostics

    def _flush(self, t_start: float, base_elapsed: float) -> None:
        """Write this step's metrics record, if anything was logged at this step."""
        if not self.record and self.step != 0:
            return
        c = self.counters
        c["elapsed"] = base_elapsed + time.perf_counter() - t_start
        record = {
            "step": self.step,
            "tokens": c["tokens"],
            "examples": c["examples"],
            "lr": self.scheduler.get_last_lr()[0],
            "weights": dict(zip(self.names, self.sampler.weights.tolist())),
            "drawn": dict(zip(self.names, c["drawn"])),
            **self.record,
            "time": round(c["elapsed"], 3),
        }
        self.record = {}
        if self.acc.is_main_process:
            self.rundir.append_metrics(record)
        if self.cfg.report_to:
            self.acc.log(flat({k: v for k, v in record.items() if k != "step"}), step=self.step)

    def _save(self, t_start: float, base_elapsed: float) -> None:
        # A finite gradient can still overflow the weights (an absurd lr or weight decay): never
        # write such weights over a good checkpoint. One host sync, at checkpoints only.
        bad = torch.stack([~torch.isfinite(local(p)).all() for p in self.params]).sum().double()
        if self.world > 1:
            bad = self.acc.reduce(bad, reduction="sum")
        if bad.item():
            raise TrainingError(
                f"parameters became non-finite by step {self.step} (train.lr="
                f"{self.cfg.train.lr:g}, weight_decay={self.cfg.train.weight_decay:g}); lower "
                "them. Nothing was saved for this step; the last checkpoint is intact."
            )
        self.counters["elapsed"] = base_elapsed + time.perf_counter() - t_start
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
                "counters": self.counters,
                "eval_cache": self.eval_cache,
                "base_scores": self.base_scores,
            },
            rank_state={"sums": {k: v.cpu() for k, v in self.sums.items()}},
        )

    def _finish(self, t_start: float, base_elapsed: float) -> dict:
        elapsed = base_elapsed + time.perf_counter() - t_start
        summary = {
            "steps": self.step,
            "examples": self.counters["examples"],
            "tokens": self.counters["tokens"],
            "input_tokens": self.counters["input_tokens"],
            "seconds": round(elapsed, 3),
            "final_eval": (self.eval_cache or {}).get("result"),
            "weights": dict(zip(self.names, self.sampler.weights.tolist())),
            "output_dir": str(self.rundir.path),
        }
        model = self.acc.unwrap_model(self.model)
        # FSDP2 shards: every rank takes part in the gather, rank 0 keeps the full tensors
        full = checkpoint.full_state_dict(model, keep=self.acc.is_main_process)
        if self.acc.is_main_process:
            best = best_feasible_for_run(self.rundir.path, self.dom_infos)
            if best is not None:  # the best evaluated step with every constraint kept
                summary["best_feasible"] = best
            setup.save_final(model, self.tokenizer, self.rundir.path / "final", full)
            self.rundir.write_json("summary.json", summary)
        self.acc.wait_for_everyone()
        return summary

    def _data_summary(self) -> dict:
        return {
            "datasets": {
                t.name: {
                    "examples": t.size,
                    "tokens": int(t.label_counts.sum()),
                    "truncated": t.data.n_truncated,
                    "dropped": t.data.n_dropped,
                    "repeat": t.repeat,
                }
                for t in self.train_sets
            },
            "evals": {
                d.name: {
                    "examples": len(d.data),
                    "role": d.role,
                    "metric": d.metric,
                    "accuracy": d.accuracy,
                    "truncated": d.data.n_truncated,
                }
                for d in self.all_domains
            },
        }


def train(cfg: RunConfig) -> dict:
    """Build a :class:`Trainer` from ``cfg`` and run it; returns the run summary."""
    return Trainer(cfg).run()
