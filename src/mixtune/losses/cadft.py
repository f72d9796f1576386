"""CADFT: Compatibility-Aware Dynamic Fine-Tuning (``loss.name: cadft``).

Zhou, Sheng, Wang, Shen, "Compatibility-Aware Dynamic Fine-Tuning for Large Language Models",
ACL 2026 (arXiv 2606.11206); built on DFT (Wu et al., arXiv 2508.05629, ``mixtune.losses.dft``).
DFT stabilises training per token; CADFT does the same per *sample*: demonstrations the current
model finds incompatible (low likelihood) are down-weighted, and persistently incompatible ones
are eventually rewritten by the model itself (:mod:`mixtune.losses.rewrite`).

Update rule, per optimizer step over the global batch B (all micro-batches, all ranks):

    c_i = (1/|y_i|) sum_t -log p(y_it | x_i, y_i<t)     detached; higher = less compatible
    z_i = (c_i - mean_B(c)) / (std_B(c) + eps)          population std, eps = 1e-6
    w_i = exp(-beta * max(0, z_i))                       beta = 1; w = 1 whenever z <= 0
    L   = sum_i w_i sum_t -sg(p_it) log p_it / (supervised tokens of B)

``stats: global`` (default, faithful) computes c in ``prepare`` with a no-grad forward over this
rank's micro-batches and all-reduces (sum c, sum c^2, count), so w does not depend on how the
batch is split. beta = 0 (with ``rewrite.enabled: false``) is exactly DFT.

Deliberate choices where the sources are silent (the paper note's PROPOSALs, all options):

1. ``stats: micro_batch`` is a cheaper deviation: c from the training forward, z-scored within
   each micro-batch (no extra forward; the weights then depend on the micro-batch split).
2. ``reduction: token_mean`` (default) reproduces the DFT code when w = 1; ``sample_mean`` is
   (1/N) sum_i w_i mean_t l_it, the note's literal (1/|B|) sum w L. Neither renormalises by sum w.
3. A population std; a batch of one sample (or sigma = 0) gives z = 0, so w = 1.
4. The compatibility forward runs in eval mode (no dropout); ``micro_batch`` uses train mode.
5. Rewriting is on by default with run-length-scaled warm-up and interval; see
   mixtune.losses.rewrite.

Packed rows (``train.packing``): c, z and w are per *example* (each example's tokens found by
its segment), and w multiplies each of its tokens instead of a row: the padded computation up
to float rounding (tests/test_packing.py). Micro-batches by token budget
(``train.micro_batch_tokens``) are refused: the rewriter locates examples by their slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from mixtune.data.collate import example_sums, target_owner
from mixtune.losses.base import Loss
from mixtune.losses.core import IGNORE, LossTerms, sequence_mean
from mixtune.losses.dft import TokenProbStats, dft_terms
from mixtune.losses.generation import RewriterConfig
from mixtune.losses.logits import token_nll
from mixtune.losses.rewrite import RewriteConfig, Rewriter
from mixtune.schema import check

if TYPE_CHECKING:
    from mixtune.engine.state import TrainState


@dataclass(frozen=True)
class CADFTConfig:
    beta: float = 1.0
    """Strength of the down-weighting; 0 = DFT."""
    eps: float = 1e-6
    stats: Literal["global", "micro_batch"] = "global"
    """Where c and its z-score come from (see the module docstring)."""
    reduction: Literal["token_mean", "sample_mean"] = "token_mean"
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    rewriter: RewriterConfig = field(default_factory=RewriterConfig)

    def __post_init__(self):
        check(0 <= self.beta < math.inf, "loss.beta", "must be >= 0 and finite", self.beta)
        check(self.eps > 0, "loss.eps", "must be > 0", self.eps)


def zscore_weights(
    c: torch.Tensor, s1: float, s2: float, n: float, beta: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, w)`` for compatibilities ``c`` given batch sums (sum c, sum c^2, count)."""
    c = c.double()
    if n <= 1:
        z = torch.zeros_like(c)
    else:
        mu = s1 / n
        sigma = math.sqrt(max(s2 / n - mu * mu, 0.0))
        z = (c - mu) / (sigma + eps)
    return z, torch.exp(-beta * z.clamp(min=0))


class CADFT(Loss):
    """DFT with sample weights exp(-beta * max(0, z)) from the batch-standardised mean NLL."""

    Config = CADFTConfig

    @staticmethod
    def requires(o: CADFTConfig) -> dict[str, str]:
        rows = {"example_slots": "CADFT locates each example of the step by its micro-batch slot"}
        if not o.rewrite.enabled:
            return rows
        why = "loss.rewrite.enabled: CADFT rewriting {} (loss.rewrite.enabled=false does not)"
        need = {
            **rows,
            "random_access": why.format("replaces training examples by index"),
            "whole_params": why.format("generates with the whole model on rank 0"),
        }
        if o.rewrite.schedule == "scaled":
            need["fixed_length"] = "loss.rewrite.schedule: scaled times rewriting by max_steps"
        return need

    def __init__(self, options: CADFTConfig | None = None):
        self.options = options or CADFTConfig()
        self.probs = TokenProbStats()
        self.stats = None  # (8,) f64: n, sum w, sum w^2, n(w<1), sum mu, sum sigma, n_mu, min w
        self.pending = None  # the same for the step in progress (committed in after_step)
        self.rows: list[torch.Tensor] = []  # this step's (pos, dataset, index, c, z) rows
        self.world = 1
        self.rewriter = None
        if self.options.rewrite.enabled:
            self.rewriter = Rewriter(self.options.rewrite, self.options.rewriter)

    # -- the per-step hooks ---------------------------------------------------------------------
    def prepare(self, state: TrainState, batches: list[dict]) -> list[dict]:
        o = self.options
        # A probing mixer's branch steps also run prepare and __call__ but never after_step:
        # start each step clean, so only real steps reach the moving averages and the logs.
        self.rows, self.pending, self.probs.pending = [], None, None
        self.world = state.world
        extras = []
        for m, b in enumerate(batches):
            start = (m * state.world + state.rank) * state.micro  # data.sampler.shard
            n = len(b["index"])  # examples (a packed micro-batch has fewer rows)
            pos = torch.arange(start, start + n, device=b["labels"].device)
            extras.append({"pos": pos, "domain": b["domain"], "index": b["index"]})
            if "segment" in b:  # packed rows (train.packing): each token's example
                extras[-1]["segment"] = b["segment"]
        device = state.acc.device
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # sum c, c^2, n, tokens, n_all
        if o.stats == "global":
            for b, x in zip(batches, extras):
                x["c"] = _compatibility(state, b)  # (B,) no-grad forward
                sums[:3] += torch.stack(
                    [
                        x["c"].sum(),
                        (x["c"] ** 2).sum(),
                        torch.tensor(float(len(x["c"])), dtype=torch.float64, device=device),
                    ]
                )
        for b in batches:
            sums[3] += (b["labels"][:, 1:] != IGNORE).sum()
            sums[4] += len(b["index"])
        if state.world > 1:
            sums = state.acc.reduce(sums, reduction="sum")
        s = sums.tolist()  # host sync, once per step
        for x in extras:
            x["per_sample"] = s[3] / max(s[4], 1.0)  # sample_mean: global tokens / samples
            if o.stats == "global":
                x["z"], x["w"] = zscore_weights(x["c"], s[0], s[1], s[2], o.beta, o.eps)
        if o.stats == "global":
            mu = s[0] / max(s[2], 1.0)
            self._add_stat(mu, math.sqrt(max(s[1] / max(s[2], 1.0) - mu * mu, 0.0)), device)
        return extras

    def terms(self, nll: torch.Tensor, mask: torch.Tensor, extra=None) -> LossTerms:
        o = self.options
        terms = dft_terms(nll, mask)
        self.probs.add(terms.token_weights, terms.mask)
        seg = None if extra is None else extra.get("segment")
        if extra is None or o.stats == "micro_batch":
            rows = terms.mask.shape[0] if seg is None else len(extra["index"])
            c = _example_mean(terms.per_token.detach(), terms.mask, seg, rows).double()  # (B,)
            n = float(len(c))
            z, w = zscore_weights(c, float(c.sum()), float((c * c).sum()), n, o.beta, o.eps)
            mu = float(c.mean())
            self._add_stat(mu, math.sqrt(max(float((c * c).mean()) - mu * mu, 0.0)), c.device)
        else:
            c, z, w = extra["c"], extra["z"], extra["w"]
        self._add_weights(w)
        if extra is not None and self.rewriter is not None:
            self.rows.append(
                torch.stack(
                    [
                        extra["pos"].double(),
                        extra["domain"].double(),
                        extra["index"].double(),
                        c.double(),
                        z,
                    ],
                    1,
                )
            )
        sw = w
        if o.reduction == "sample_mean" and extra is not None:
            tokens = _example_tokens(terms.mask, seg, len(w))
            sw = w * extra["per_sample"] / tokens.clamp(min=1).double()
        if seg is None:
            terms.sample_weights = sw.to(terms.per_token.dtype)
        else:  # packed rows: each example's weight on each of its tokens
            tw = sw.to(terms.per_token.dtype)[target_owner(seg)].view_as(terms.mask)
            terms.token_weights = terms.token_weights * tw
        return terms

    def after_step(self, state: TrainState) -> None:
        self.probs.commit()
        if self.pending is not None:
            if self.stats is None:
                self.stats = self.pending
            else:
                self.stats = self.stats.to(self.pending.device)  # CPU after a resume
                self.stats[:7] += self.pending[:7]
                self.stats[7] = torch.minimum(self.stats[7], self.pending[7])
            self.pending = None
        if self.rewriter is not None:
            self.rewriter.observe(state, self.rows)
            self.rewriter.maybe_rewrite(state)
        self.rows = []

    def on_resume(self, state: TrainState) -> None:
        """Re-apply the restored rewrites to the training data before the first resumed step,
        so that step's batches and token count are the uninterrupted run's."""
        if self.rewriter is not None:
            self.rewriter.restore(state)

    # -- logging and state ----------------------------------------------------------------------
    def diagnostics(self, state: TrainState) -> dict[str, float]:
        out = self.probs.take(state)
        s = self.stats if self.stats is not None else _empty_stats(state.acc.device)
        s = s.to(state.acc.device)
        if state.world > 1:
            rows = state.acc.gather(s[None]).view(state.world, 8)
            s = torch.cat([rows[:, :7].sum(0), rows[:, 7].min()[None]])
        s = s.tolist()  # host sync: log steps only
        self.stats = None
        n, k = max(s[0], 1.0), max(s[6], 1.0)
        mean = s[1] / n
        out.update(
            {
                "w_mean": mean,
                "w_min": s[7] if s[0] else 1.0,
                "w_std": math.sqrt(max(s[2] / n - mean * mean, 0.0)),
                "down_frac": s[3] / n,
                "ess": s[1] ** 2 / (n * max(s[2], 1e-300)),
                "c_mean": s[4] / k,
                "c_std": s[5] / k,
            }
        )
        if self.rewriter is not None:
            out.update(self.rewriter.diagnostics())
        return out

    def state_dict(self) -> dict:
        # The log accumulators of one process only: kept when that is the whole run.
        stats = self.stats.cpu() if self.world == 1 and self.stats is not None else None
        state = {"probs": self.probs.state_dict(self.world), "stats": stats}
        if self.rewriter is not None:
            state["rewriter"] = self.rewriter.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.probs.load_state_dict(state.get("probs", {}))
        self.stats = state.get("stats")
        if self.rewriter is not None and "rewriter" in state:
            self.rewriter.load_state_dict(state["rewriter"])

    def _add_weights(self, w: torch.Tensor) -> None:
        w = w.detach().double()
        row = torch.stack(
            [
                torch.tensor(float(len(w)), dtype=torch.float64, device=w.device),
                w.sum(),
                (w * w).sum(),
                (w < 1).sum().double(),
            ]
        )
        self._ensure(w.device)
        self.pending[:4] += row
        self.pending[7] = torch.minimum(self.pending[7], w.min())

    def _add_stat(self, mu: float, sigma: float, device) -> None:
        self._ensure(device)
        self.pending[4] += mu
        self.pending[5] += sigma
        self.pending[6] += 1

    def _ensure(self, device) -> None:
        if self.pending is None:
            self.pending = _empty_stats(device)


def _empty_stats(device) -> torch.Tensor:
    s = torch.zeros(8, dtype=torch.float64, device=device)
    s[7] = math.inf  # running min of w
    return s


def _compatibility(state: TrainState, batch: dict) -> torch.Tensor:
    """Mean response-token NLL of each example under the current model, (B,) float64."""
    model = state.model
    was_training = model.training
    model.eval()
    seg = batch.get("segment")
    with torch.no_grad(), state.acc.autocast():
        nll, mask = token_nll(
            model,
            batch["input_ids"],
            batch.get("attention_mask"),
            batch["labels"],
            batch.get("position_ids"),
        )
    if was_training:
        model.train()
    return _example_mean(nll, mask, seg, len(batch["index"])).double()


def _example_tokens(mask: torch.Tensor, segment: torch.Tensor | None, n: int) -> torch.Tensor:
    """Supervised tokens of each example: per row, or per segment of packed rows."""
    return mask.sum(-1) if segment is None else example_sums(mask, segment, n)


def _example_mean(nll: torch.Tensor, mask: torch.Tensor, segment: torch.Tensor | None, n: int):
    """Mean per-token loss of each of the ``n`` examples (:func:`sequence_mean` per row, or per
    segment of packed rows)."""
    if segment is None:
        return sequence_mean(nll, mask)
    return example_sums(nll * mask, segment, n) / example_sums(mask, segment, n).clamp(min=1)
