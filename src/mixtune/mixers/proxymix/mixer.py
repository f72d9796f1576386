"""ProxyMix: a replay controller learned on a small proxy model, frozen, used on the target.

Shihab, Afrin, Sharma, "Dynamic Proxy-Mixing: Transferring Replay Controllers from Small to
Large Models for Continual Instruction Tuning", arXiv 2606.00400 (2026). In a continual run
(``mixtune proxymix run``) every stage trains on [current task, replay buffers of earlier tasks,
optional safety buffer]; this mixer sets those shares at each decision. Only the abstract of the
paper could be read: the state (normalised validation losses and their dynamics), the masked
action over the current task and accessible buffers, RL on a proxy and the frozen transfer are
[SRC]; every formula below is our [PROPOSAL] reading (docs/proxymix.md).

Update rule (at each of ``decisions`` evenly spaced steps of a stage, or every ``update_every``):

    L_i = validation loss of slot i's domain (ctx.evaluate, loss only); ratio_i = L_i / ref_i
    x_i = [ratio, rank, delta, EMA trend, peak increase, is_current, is_safety, age, progress,
           stage]                                     (mixtune.mixers.proxymix.features)
    policy controller: z = phi(x) (the frozen network), pi = p_min e_c + (1 - p_min)
        softmax(z / T) over accessible slots; future tasks and absent slots get exactly 0
    policy fixed:      pi_c = 1 - replay_ratio, the rest spread uniformly / by buffer size
    policy loss_increase: buffers ∝ max(0, ratio_i - 1), total replay
        min(1 - p_min, heuristic_scale * sum_i max(0, ratio_i - 1))
    policy loss:       pi ∝ ratio_i with the current-task floor (the note's heuristic)
    policy random:     a seeded, untrained controller (sanity baseline)

Deliberate simplifications (numbered):

1. The controller is learned with REINFORCE and a moving-average baseline
   (``mixtune.mixers.proxymix.learn``); PPO (the note's P7 default) is not implemented.
2. Exploration is Gaussian noise (``explore_sigma``) on the logits, keyed by (``explore_seed``
   or the run seed, stage, step); deployment uses the deterministic mean (``explore_sigma: 0``).
3. The dynamics features are in log-ratio space (see :mod:`mixtune.mixers.proxymix.features`).
4. The stage context (current task, safety buffer, carried references, when each buffer was
   learned, stage index) comes from the continual driver through the stage hooks
   (:class:`mixtune.continual.hooks.StageAware`), never through the options; used on its own
   (``mixtune train``), the first dataset is the current task and the others are buffers.
5. A slot without an evaluation domain of its name has constant features (ratio 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mixtune.continual.hooks import StageAware, StageContext, StageEnd, StageOutcome
from mixtune.errors import ConfigError
from mixtune.mixers.base import DatasetInfo, DomainInfo, MixContext, Steps, Weights
from mixtune.mixers.proxymix import controller as ctl
from mixtune.mixers.proxymix.features import (
    FEATURES,
    Tracker,
    global_features,
    masked_policy,
    slot_features,
)


@dataclass(frozen=True)
class ProxyMixConfig:
    policy: Literal["controller", "random", "fixed", "loss_increase", "loss"] = "controller"
    """Who decides: the frozen ``controller``, or a baseline (see the module docstring)."""
    controller: str | None = None
    """Frozen controller file from ``mixtune proxymix learn`` (policy controller), or
    ``builtin``: the controller shipped with mixtune, learned on a proxy of the built-in
    continual sequences (``mixtune/mixers/proxymix/builtin/CARD.md``)."""
    decisions: int = 10
    """Decisions per stage, evenly spaced (a fraction of a stage, so it transfers)."""
    update_every: int | None = None
    """Or: a decision every this many steps (overrides ``decisions``)."""
    p_min: float = 0.3
    """Minimum share of the current task (learned and heuristic policies)."""
    temperature: float = 1.0
    beta: float = 0.9
    """EMA factor of the loss trend feature."""
    replay_ratio: float = 0.2
    """Policy fixed: the total replay share (also the transfer fallback)."""
    spread: Literal["uniform", "proportional"] = "uniform"
    """Policy fixed: spread replay uniformly over buffers, or by buffer size."""
    heuristic_scale: float = 1.0
    """Policy loss_increase: replay share per unit of summed loss-ratio increase."""
    eval_batches: int | None = None
    """Evaluation batches per decision (null: all of each domain, the same batches as the
    driver's end-of-stage evaluation)."""
    explore_sigma: float = 0.0
    """Std of Gaussian noise on the logits (RL episodes only; 0 = deterministic)."""
    explore_seed: int | None = None
    """Seed of the exploration noise (null: the run's seed)."""
    explore_mirror: bool = False
    """Negate the exploration noise (RL only: the antithetic twin of an episode)."""
    accessible: tuple[str, ...] | None = None
    """Datasets the mixer may weight (null: all); any other dataset always gets 0."""
    safety_domain: str = "safety"
    """Evaluation domain of the safety score (global feature; the safety slot's loss); in a
    continual stage, the stage's safety domain."""

    def __post_init__(self):
        def bad(key, rule):
            raise ConfigError(f"mixer.{key}: {rule}, got {getattr(self, key)!r}")

        if self.policy == "controller" and not self.controller:
            raise ConfigError(
                "mixer.controller: required with policy 'controller' (a file "
                "from `mixtune proxymix learn`), or choose another policy"
            )
        if not 0 <= self.p_min < 1:
            bad("p_min", "must be in [0, 1)")
        if not self.temperature > 0:
            bad("temperature", "must be > 0")
        if not 0 <= self.beta < 1:
            bad("beta", "must be in [0, 1)")
        if not 0 <= self.replay_ratio <= 1:
            bad("replay_ratio", "must be in [0, 1]")
        if self.decisions < 1:
            bad("decisions", "must be >= 1")
        if self.update_every is not None and self.update_every < 1:
            bad("update_every", "must be >= 1 or null")
        if self.explore_sigma < 0 or self.heuristic_scale < 0:
            bad("explore_sigma" if self.explore_sigma < 0 else "heuristic_scale", "must be >= 0")


class ProxyMix(StageAware):
    Config = ProxyMixConfig
    requires = {
        "evaluate": "mixer 'proxymix' evaluates the domains at its decisions",
        "fixed_length": "mixer 'proxymix' places its decisions at fractions of max_steps",
    }

    def __init__(
        self,
        options: ProxyMixConfig,
        datasets: list[DatasetInfo],
        domains: list[DomainInfo],
        seed: int,
    ):
        o = self.o = options
        self.names = [d.name for d in datasets]
        self.sizes = np.array([d.size for d in datasets], np.float64)
        self.domain_names = {d.name for d in domains}
        self.seed = seed
        allowed = set(self.names if o.accessible is None else o.accessible)
        self.mask = np.array([n in allowed for n in self.names])
        self.net = None
        if o.policy == "controller":
            self.net, self.info = ctl.load(o.controller)
        elif o.policy == "random":
            self.net, self.info = ctl.new(seed), {}
        self.begin_stage(StageContext(current=self.names[0]))  # on its own: one stage

    def begin_stage(self, stage: StageContext) -> None:
        """Slots, their kinds and ages, and the carried references for this stage."""
        o = self.o
        for what, name in (("current", stage.current), ("safety_buffer", stage.safety_buffer)):
            if name is not None and name not in self.names:
                raise ValueError(
                    f"stage context: {what} '{name}' is not a training dataset ({self.names})"
                )
        self.stage = stage
        self.safety_domain = stage.safety_domain or o.safety_domain
        self.cur = self.names.index(stage.current)
        if not self.mask[self.cur]:
            raise ConfigError(
                f"mixer.accessible: must include the current task '{self.names[self.cur]}'"
            )
        self.kinds, self.ages = [], []
        for i, n in enumerate(self.names):
            kind = (
                "current" if i == self.cur else "safety" if n == stage.safety_buffer else "buffer"
            )
            self.kinds.append(kind)
            learned = (
                -1
                if kind == "safety"
                else stage.learned.get(n, stage.index if kind == "current" else stage.index - 1)
            )
            self.ages.append((stage.index - learned) / stage.n_stages)
        # what each slot is measured on: its own domain; the safety buffer: the safety domain
        self.keys = [
            self.safety_domain if k == "safety" else n for n, k in zip(self.names, self.kinds)
        ]
        self.keys = [k if k in self.domain_names else None for k in self.keys]
        self.tracker = Tracker(o.beta, stage.carry)
        self.trajectory: list[dict] = []

    def update_steps(self, max_steps: int) -> Steps:
        if self.o.update_every:
            return Steps.every(self.o.update_every, max_steps)
        return Steps(int(k * max_steps / self.o.decisions) for k in range(self.o.decisions))

    # ------------------------------------------------------------------------------------------
    def propose(self, ctx: MixContext) -> Weights:
        o = self.o
        ev = self._evaluate(ctx)
        obs = self._observe({k: m["loss"] for k, m in ev.items()}, ctx.step, ctx.max_steps)
        action = None
        if o.policy in ("controller", "random"):
            x = torch.as_tensor(np.asarray(obs["x"], np.float32))
            g = torch.as_tensor(np.asarray(obs["g"], np.float32))
            mask = torch.as_tensor(self.mask)
            with torch.no_grad():
                z = self.net(x, g, mask).double()
            if o.explore_sigma > 0:
                seed = self.seed if o.explore_seed is None else o.explore_seed
                rng = np.random.default_rng([seed, self.stage.index, ctx.step, 0x9E37])
                sign = -1.0 if o.explore_mirror else 1.0
                z = z + sign * o.explore_sigma * torch.as_tensor(rng.standard_normal(len(z)))
            action = z.tolist()
            p = masked_policy(z, mask, self.cur, o.p_min, o.temperature).numpy()
        else:
            p = self._baseline(obs["ratios"])
        p = np.where(self.mask, p, 0.0)
        p = p / p.sum()
        obs.update(action=action, weights=p.tolist())
        self.trajectory.append(obs)
        ctx.log("ratio", obs["ratios"])
        ctx.log("p", dict(zip(self.names, p.tolist())))
        return p

    def _evaluate(self, ctx: MixContext) -> dict:
        """Validation losses on the same batches at every decision: with ``eval_batches`` set,
        the loop's cached full evaluation (step 0) must not be reused."""
        if self.o.eval_batches is None:
            return ctx.evaluate(n_batches=None, accuracy=False)
        try:
            return ctx.evaluate(n_batches=self.o.eval_batches, accuracy=False, use_cache=False)
        except TypeError:  # a context whose evaluate has no cache to bypass
            return ctx.evaluate(n_batches=self.o.eval_batches, accuracy=False)

    def _baseline(self, ratios: dict) -> np.ndarray:
        o, K = self.o, len(self.names)
        buf = np.array([self.mask[i] and i != self.cur for i in range(K)])
        p = np.zeros(K)
        if o.policy == "loss":
            r = np.array(
                [ratios.get(n, 1.0) if self.mask[i] else 0.0 for i, n in enumerate(self.names)]
            )
            p = (1 - o.p_min) * r / r.sum()
            p[self.cur] += o.p_min
            return p
        if not buf.any():
            p[self.cur] = 1.0
            return p
        if o.policy == "fixed":
            share = np.where(buf, self.sizes if o.spread == "proportional" else 1.0, 0.0)
            total = o.replay_ratio
        else:  # loss_increase
            share = np.array(
                [
                    max(0.0, ratios.get(n, 1.0) - 1.0) if buf[i] else 0.0
                    for i, n in enumerate(self.names)
                ]
            )
            total = min(1.0 - o.p_min, o.heuristic_scale * share.sum())
        if share.sum() > 0:
            p = total * share / share.sum()
        p[self.cur] = 1.0 - p.sum()
        return p

    def _observe(self, losses: dict, step: int, max_steps: int) -> dict:
        """Features and the observation record (ratios of slots and safety) at this point."""
        seen: dict[str, tuple] = {}
        for key in {k for k, m in zip(self.keys, self.mask) if m and k} | (
            {self.safety_domain} & set(losses)
        ):
            if key in losses:
                seen[key] = self.tracker.observe(key, losses[key])
        idx = np.flatnonzero(self.mask)
        per = [seen.get(self.keys[i]) or (1.0, 0.0, 0.0, 0.0) for i in idx]
        x = np.zeros((len(self.names), len(FEATURES)), np.float32)
        x[idx] = slot_features(
            per,
            [self.kinds[i] for i in idx],
            [self.ages[i] for i in idx],
            step / max(max_steps, 1),
            (self.stage.index + 1) / self.stage.n_stages,
        )
        safety = seen.get(self.safety_domain)
        return {
            "step": step,
            "slots": list(self.names),
            "mask": self.mask.tolist(),
            "current": self.names[self.cur],
            "x": x.tolist(),
            "g": global_features(safety).tolist(),
            "buffers": [self.names[i] for i in idx if self.kinds[i] == "buffer"],
            "ratios": {self.names[i]: float(p[0]) for i, p in zip(idx, per)},
            "safety": None if safety is None else float(safety[0]),
        }

    # ------------------------------------------------------------------------------------------
    def end_stage(self, end: StageEnd) -> StageOutcome:
        """Record the end-of-stage observation (it closes the last decision's reward) and carry
        the references on, with the task just learned rebased: it becomes a buffer."""
        o = self.o
        # the references must come from the batches the decisions evaluate
        losses = end.losses if o.eval_batches is None else end.evaluate(o.eval_batches)
        obs = self._observe(losses, end.max_steps, end.max_steps)
        obs.update(action=None, weights=None, end=True)
        self.trajectory.append(obs)
        carry = Tracker(o.beta, self.tracker.state())
        carry.rebase(self.stage.current, losses[self.stage.current])
        return StageOutcome(carry=carry.state(), trajectory=list(self.trajectory))

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state(), "trajectory": list(self.trajectory)}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.slots = {k: dict(v) for k, v in state["tracker"].items()}
        self.trajectory = list(state["trajectory"])
