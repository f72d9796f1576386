"""The loop's bookkeeping: counters, running loss sums, and one metrics record per logged step.

Per-dataset (NLL sum, supervised tokens) pairs and gradient-norm moments are summed on the
device after every step and read (all-reduced over ranks, one host sync) only at log steps and
mixer updates: ``"log"`` feeds the ``train`` entry of the record, ``"mix"`` the mixer's
``train_losses``. Whatever the loop logs at a step (``train``, ``eval``, ``mixer``, ``loss``)
goes into :attr:`Metrics.record`; :meth:`Metrics.flush` writes it to ``metrics.jsonl`` (and the
trackers) with the step's counters, learning rate and weights.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from mixtune.config import RunConfig
from mixtune.engine.process import flat
from mixtune.engine.rundir import RunDir
from mixtune.engine.step import StepStats
from mixtune.errors import TrainingError

log = logging.getLogger(__name__)


class Metrics:
    """Counters and running sums of one run, and the record of the step in progress.

    ``lengths``: per training dataset, each example's length in tokens (kept up to date by the
    loop, as the datasets' ``label_counts`` are, when an example is replaced).
    """

    def __init__(self, train_sets, lengths: list, acc, rundir: RunDir, cfg: RunConfig):
        self.train_sets, self.lengths = train_sets, lengths
        self.names = [t.name for t in train_sets]
        self.acc, self.rundir, self.world = acc, rundir, acc.num_processes
        self.report_to, self.max_nonfinite = cfg.report_to, cfg.train.max_nonfinite
        self.counters = {
            "tokens": 0,
            "input_tokens": 0,
            "examples": 0,
            "elapsed": 0.0,
            "drawn": [0] * len(self.names),
            "skipped_nonfinite": 0,
            "nonfinite_streak": 0,
        }
        K = len(self.names)
        self.sums = {
            "log": torch.zeros(K, 2, dtype=torch.float64, device=acc.device),
            "mix": torch.zeros(K, 2, dtype=torch.float64, device=acc.device),
            "gn": torch.zeros(4, dtype=torch.float64, device=acc.device),
        }
        self.record: dict = {}

    def count(self, step: int, ds: np.ndarray, ex: np.ndarray, stats: StepStats) -> None:
        """Add step ``step``'s batch ``(ds, ex)`` and its statistics. Too many non-finite steps
        in a row stop the run (``train.max_nonfinite``)."""
        c = self.counters
        if stats.overflow:  # fp16: the loss scaler skipped the step and halved its scale
            c["skipped_overflow"] = c.get("skipped_overflow", 0) + 1
            self.record["skipped_overflow"] = c["skipped_overflow"]
            self.record["loss_scale"] = stats.loss_scale
            log.info(
                "step %d: fp16 gradient overflow; update skipped, loss scale now %g",
                step,
                stats.loss_scale,
            )
            return
        if stats.skipped:
            c["skipped_nonfinite"] += 1
            c["nonfinite_streak"] += 1
            self.record["skipped_nonfinite"] = c["skipped_nonfinite"]
            log.warning(
                "step %d: non-finite loss/gradient; update skipped (%d so far)",
                step,
                c["skipped_nonfinite"],
            )
            if c["nonfinite_streak"] >= self.max_nonfinite:
                raise TrainingError(
                    f"{c['nonfinite_streak']} consecutive non-finite steps up to step "
                    f"{step} (train.max_nonfinite={self.max_nonfinite}); lower "
                    "train.lr or check the data. The last checkpoint is intact."
                )
            return
        c["nonfinite_streak"] = 0
        c["examples"] += len(ds)
        c["tokens"] += int(sum(self.train_sets[k].label_counts[e] for k, e in zip(ds, ex)))
        c["input_tokens"] += int(sum(self.lengths[k][e] for k, e in zip(ds, ex)))
        drawn = np.bincount(ds, minlength=len(self.names))
        c["drawn"] = [int(a + b) for a, b in zip(c["drawn"], drawn)]
        self.sums["log"] += stats.per_dataset
        self.sums["mix"] += stats.per_dataset
        g = stats.grad_norm
        gn = self.sums["gn"]
        gn[:3] += torch.stack([g, torch.ones_like(g), g * g])
        gn[3] = torch.maximum(gn[3], g)

    def take_sums(self, key: str) -> np.ndarray:
        """Per-dataset (NLL sum, tokens) since the last call, summed over ranks; resets them."""
        sums = self.sums[key]
        if self.world > 1:
            sums = self.acc.reduce(sums, reduction="sum")
        out = sums.cpu().numpy().copy()  # host sync: only at log and mixer-update steps
        self.sums[key].zero_()
        return out

    def train_losses(self, key: str) -> dict[str, float]:
        """Mean training loss per dataset since the last call (datasets drawn since)."""
        sums = self.take_sums(key)
        return {n: float(s / t) for n, (s, t) in zip(self.names, sums) if t > 0}

    def log_train(self) -> float:
        """Record the training losses and gradient norms since the last log; returns the loss.

        When every step since the last log was skipped (non-finite, or an fp16 overflow) there
        is nothing to average: no ``train`` entry (the record says ``skipped_*``), and NaN, not
        a loss of 0.0.
        """
        sums = self.take_sums("log")
        per = {n: float(s / t) for n, (s, t) in zip(self.names, sums) if t > 0}
        total = sums.sum(0)
        gn = self.sums["gn"].cpu().numpy().copy()  # the global norm: equal on every rank
        self.sums["gn"].zero_()
        if gn[1] == 0:  # no step counted (the same on every rank: skips are global)
            return float("nan")
        loss = float(total[0] / max(total[1], 1))
        mean = gn[0] / max(gn[1], 1)
        self.record["train"] = {
            "loss": loss,
            "per_dataset": per,
            "grad_norm": float(mean),
            "grad_norm_std": float(np.sqrt(max(gn[2] / max(gn[1], 1) - mean**2, 0.0))),
            "grad_norm_max": float(gn[3]),
        }
        return loss

    def flush(self, step: int, lr: float, weights: np.ndarray, elapsed: float) -> None:
        """Write step ``step``'s record, if anything was logged at it (step 0 always)."""
        if not self.record and step != 0:
            return
        c = self.counters
        c["elapsed"] = elapsed
        record = {
            "step": step,
            "tokens": c["tokens"],
            "examples": c["examples"],
            "lr": lr,
            "weights": dict(zip(self.names, weights.tolist())),
            "drawn": dict(zip(self.names, c["drawn"])),
            **self.record,
            "time": round(c["elapsed"], 3),
        }
        self.record = {}
        if self.acc.is_main_process:
            self.rundir.append_metrics(record)
        if self.report_to:
            self.acc.log(flat({k: v for k, v in record.items() if k != "step"}), step=step)

    def summary(
        self, step: int, elapsed: float, final_eval, weights: np.ndarray, resumed: float = 0.0
    ) -> dict:
        """The run's totals (``summary.json``). ``seconds``: training time over every attempt
        (the run's clock, kept by checkpoints); ``resumed_seconds``: the part this process
        resumed with (0 for a run that started fresh), so that a process's wall time plus it
        is the whole run's cost."""
        return {
            "steps": step,
            "examples": self.counters["examples"],
            "tokens": self.counters["tokens"],
            "input_tokens": self.counters["input_tokens"],
            "seconds": round(elapsed, 3),
            "resumed_seconds": round(resumed, 3),
            "final_eval": final_eval,
            "weights": dict(zip(self.names, weights.tolist())),
            "output_dir": str(self.rundir.path),
        }

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The run-wide part (the same on every rank)."""
        return {"counters": self.counters}

    def rank_state_dict(self) -> dict:
        """This rank's part: its running sums."""
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}}

    def load_state_dict(self, state: dict, rank_state: dict) -> None:
        self.counters = {**self.counters, **state["counters"]}
        for key, value in rank_state["sums"].items():
            self.sums[key] = value.to(self.acc.device)


def data_summary(train_sets, domains) -> dict:
    """What ``data.json`` says about the training datasets and evaluation domains."""
    return {
        "datasets": {
            t.name: {
                "examples": t.size,
                "tokens": int(t.label_counts.sum()),
                "truncated": t.data.n_truncated,
                "dropped": t.data.n_dropped,
                "repeat": t.repeat,
            }
            for t in train_sets
        },
        "evals": {
            d.name: {
                "examples": len(d.data),
                "role": d.role,
                "metric": d.metric,
                "accuracy": d.accuracy,
                "truncated": d.data.n_truncated,
            }
            for d in domains
        },
    }
