"""Compatibility-guided rewriting of persistently incompatible targets (CADFT, arXiv 2606.11206).

The rule: keep a moving average of each training example's compatibility score; after a
warm-up, every R steps select the persistently worst ``fraction`` of the training data, and
replace each selected target, with probability ``prob``, by the model's own sample for the prompt
(nucleus sampling, top-p 0.9, temperature 0.7). Delay, low frequency, a small fraction and the
coin flip guard against collapsing onto what the model can already say.

Details the paper leaves open (our choices, documented in docs/cadft.md):

1. The score averaged is the batch z-score (``score: z``; or the raw mean NLL), by an EMA with
   decay 0.9 seeded with the first observation. Candidates need >= ``min_visits`` (2)
   observations and, for z, a positive average; ties break by (dataset, index).
2. ``fraction`` is of all training examples, ceil(0.005 * N). A rewritten example's average is
   reset, and it may be selected (and rewritten) again later; the original stays in the log.
3. The paper's 3000-step warm-up and 1000-step interval exceed short SFT runs. ``schedule:
   scaled`` (default) reads them per ``ref_steps`` = 10000 steps: warm-up = ceil(max_steps *
   warmup / ref_steps), interval = max(1, round(max_steps * every / ref_steps)), i.e. 30% of
   the run and then every 10%. ``absolute`` uses the numbers as steps (a warning says when
   rewriting can never fire). Events happen at steps s >= warm-up with (s - warm-up) % interval
   == 0, never at the last step.
4. The new target is the sample decoded to text, re-rendered as the final assistant turn by
   the chat template and tokenised like mixtune.data.tokenize (prompt tokens kept as they are),
   truncated to train.max_length. Examples without a prompt (raw text) are never rewritten.
5. Randomness (coins and sampling) comes from a torch.Generator seeded by (run seed, step); the
   global RNG is untouched, so resume stays exact. Rank 0 generates and broadcasts.

Rewrites are logged to ``<output_dir>/rewrites.jsonl`` (step, dataset, index, old/new
compatibility, old/new text) and kept in the loss state (checkpoint ``loss.pt``) with their
token ids. A resumed run re-applies them before its first step (:meth:`Rewriter.restore`, from
the loss's ``on_resume``), so it sees the same training data as an uninterrupted one.
New targets are written by :mod:`mixtune.losses.generation`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from mixtune.losses.generation import RewriterConfig, TargetGenerator
from mixtune.schema import check

if TYPE_CHECKING:
    from mixtune.engine.state import TrainState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewriteConfig:
    enabled: bool = True
    """Compatibility-guided rewriting of persistently incompatible targets."""
    warmup: int = 3000
    """Steps before the first rewrite (paper: 3000), see ``schedule``."""
    every: int = 1000
    """Steps between rewrite events (paper: 1000), see ``schedule``."""
    schedule: Literal["scaled", "absolute"] = "scaled"
    """``scaled``: warmup and every are per ``ref_steps`` steps of training and scale with
    max_steps; ``absolute``: the paper's step numbers as given (faithful)."""
    ref_steps: int = 10000
    """Run length the paper's warm-up and interval are taken to refer to (``scaled`` only)."""
    fraction: float = 0.005
    """Share of all training examples selected per event (the worst by moving average)."""
    prob: float = 0.5
    """Probability that a selected example is actually rewritten."""
    ema: float = 0.9
    """Decay of the per-example moving average of the compatibility score."""
    score: Literal["z", "raw"] = "z"
    """Average the batch z-score (state-relative; default) or the raw mean NLL c."""
    min_visits: int = 2
    """Observations an example needs before it can be selected."""
    verify: bool = False
    """Keep a rewrite only if it matches the example's reference answer (off in the paper)."""

    def __post_init__(self):
        where = "loss.rewrite."
        check(self.warmup >= 0, where + "warmup", "must be >= 0", self.warmup)
        check(self.every >= 1, where + "every", "must be >= 1", self.every)
        check(self.ref_steps >= 1, where + "ref_steps", "must be >= 1", self.ref_steps)
        check(0 < self.fraction <= 1, where + "fraction", "must be in (0, 1]", self.fraction)
        check(0 <= self.prob <= 1, where + "prob", "must be in [0, 1]", self.prob)
        check(0 <= self.ema < 1, where + "ema", "must be in [0, 1)", self.ema)
        check(self.min_visits >= 1, where + "min_visits", "must be >= 1", self.min_visits)


def schedule(opts: RewriteConfig, max_steps: int) -> tuple[int, int]:
    """``(warm-up, interval)`` in steps for a run of ``max_steps``."""
    if opts.schedule == "absolute":
        return opts.warmup, opts.every
    warm = math.ceil(max_steps * opts.warmup / opts.ref_steps)
    return warm, max(1, round(max_steps * opts.every / opts.ref_steps))


def step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step, 0xCADF]).generate_state(1)[0])


class Rewriter:
    """Tracks per-example compatibility and rewrites the persistently worst targets."""

    def __init__(self, opts: RewriteConfig, gen: RewriterConfig | None):
        self.opts = opts
        self.writer = TargetGenerator(gen, opts.verify)
        self.table: dict[tuple[int, int], list] = {}  # (dataset, index) -> [ema, visits]
        self.records: list[dict] = []  # every rewrite, in order, with the new token ids
        self.events = self.rejected = 0
        self._warned = False

    # -- tracking -------------------------------------------------------------------------------
    def observe(self, state: TrainState, rows: list[torch.Tensor]) -> None:
        """Update the moving averages with this step's (pos, dataset, index, c, z) rows."""
        local = torch.cat(rows) if rows else torch.zeros(0, 5, dtype=torch.float64)
        local = local.to(state.acc.device)
        if state.world > 1:  # every rank keeps the same table: gather the whole batch
            local = state.acc.gather(local)
        data = local.cpu()  # host sync, once per step
        data = data[torch.argsort(data[:, 0], stable=True)]  # global batch order
        decay, col = self.opts.ema, 4 if self.opts.score == "z" else 3
        for row in data.tolist():
            key = (int(row[1]), int(row[2]))
            entry = self.table.get(key)
            if entry is None:
                self.table[key] = [row[col], 1]
            else:
                entry[0] = decay * entry[0] + (1 - decay) * row[col]
                entry[1] += 1
        warm, _ = schedule(self.opts, state.max_steps)
        if not self._warned and warm >= state.max_steps:
            self._warned = True
            log.warning(
                "cadft: rewrite warm-up (%d steps) >= max_steps (%d): no target will be "
                "rewritten; use loss.rewrite.schedule=scaled or fewer steps",
                warm,
                state.max_steps,
            )

    def due(self, step: int, max_steps: int) -> bool:
        warm, every = schedule(self.opts, max_steps)
        return warm <= step < max_steps and (step - warm) % every == 0

    def select(self, state: TrainState) -> list[tuple[int, int, float]]:
        """The worst ``fraction`` by moving average: ``[(dataset, index, score), ...]``."""
        n_total = sum(t.size for t in state.train_sets)
        k_sel = math.ceil(self.opts.fraction * n_total)
        cands = sorted(
            (-ema, k, e)
            for (k, e), (ema, visits) in self.table.items()
            if visits >= self.opts.min_visits
            and (self.opts.score == "raw" or ema > 0)
            and state.train_sets[k].data.prompt_len[e] > 0
        )
        return [(k, e, -neg) for neg, k, e in cands[:k_sel]]

    def maybe_rewrite(self, state: TrainState) -> None:
        step = state.step
        if not self.due(step, state.max_steps):
            return
        self.events += 1
        g = torch.Generator().manual_seed(step_seed(state.seed, step))
        chosen = self.select(state)
        coins = torch.rand(len(chosen), generator=g, dtype=torch.float64).tolist()
        chosen = [c for c, u in zip(chosen, coins) if u < self.opts.prob]
        new, rejected = None, 0
        if state.acc.is_main_process:
            new, rejected = self.writer.generate(state, chosen, g, step) if chosen else ([], 0)
        if state.world > 1:
            from accelerate.utils import broadcast_object_list

            new, rejected = broadcast_object_list([(new, rejected)])[0]
        self.rejected += rejected
        for rec in new:
            _apply(state, rec)
            self.table.pop((rec["dataset_index"], rec["example"]), None)
            self.records.append(rec)
        if state.acc.is_main_process and new:
            with open(state.run_dir / "rewrites.jsonl", "a") as f:
                for rec in new:
                    f.write(json.dumps(_public(rec)) + "\n")
        if chosen:
            log.info(
                "cadft: step %d rewrote %d of %d selected targets", step, len(new), len(chosen)
            )

    # -- resume ---------------------------------------------------------------------------------
    def restore(self, state: TrainState) -> None:
        """Re-apply every rewrite restored from a checkpoint to the training data (before the
        first resumed step, so its batches and token counts see the rewritten targets), and
        make ``rewrites.jsonl`` hold exactly those rewrites (a crash may have left later ones)."""
        for rec in self.records:
            _apply(state, rec)
        if state.acc.is_main_process:
            with open(state.run_dir / "rewrites.jsonl", "w") as f:
                for rec in self.records:
                    f.write(json.dumps(_public(rec)) + "\n")

    def diagnostics(self) -> dict[str, float]:
        return {
            "rewrites": len(self.records),
            "rewrite_events": self.events,
            "rewrites_rejected": self.rejected,
            "tracked": len(self.table),
        }

    def state_dict(self) -> dict:
        return {
            "table": {f"{k} {e}": v for (k, e), v in self.table.items()},
            "records": self.records,
            "events": self.events,
            "rejected": self.rejected,
        }

    def load_state_dict(self, state: dict) -> None:
        self.table = {
            tuple(int(x) for x in key.split()): list(v) for key, v in state["table"].items()
        }
        self.records = list(state["records"])
        self.events, self.rejected = state["events"], state["rejected"]


# ----------------------------------------------------------------------------------------------
def _apply(state: TrainState, rec: dict) -> None:
    state.replace_example(rec["dataset_index"], rec["example"], rec["input_ids"], rec["labels"])


def _public(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("input_ids", "labels")}
