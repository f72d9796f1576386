"""REINFORCE for the ProxyMix controller: an episode's decisions and rewards, and the update.

An environment plays episodes with the learner's network (``env.episode(learner, e)`` -> its
per-stage trajectories of mixer observations and a terminal bonus). Per decision u (note §2.2
P6-P7, [PROPOSAL]):

    r_u = gain of the current task - lambda_forget sum(buffer loss increases)
          - lambda_safety (safety loss increase)                (ratio units, features.reward)
    r_last += terminal_weight (AA - lambda_F F + lambda_S safety)   (end-of-sequence bonus)
    G_u = sum_{k >= u} gamma^(k-u) r_k;  A_u = (G_u - b_u) / std(A);  b_u <- m b_u + (1-m) G_u
    (b: a moving average per sequence and decision index)
    loss = -mean_u A_u log N(a_u; z_theta(x_u), sigma^2)          (one Adam step per episode)

Decisions where only the current task is accessible are forced and not learned from. The
learner state (network, optimizer, baseline, history, cost) is saved after every episode, so an
interrupted run resumes at the next episode (a half-done episode is redone from scratch;
episodes are deterministic in (seed, episode)). Environments:
:class:`mixtune.mixers.proxymix.learn.LMEnv` trains real models;
:class:`mixtune.mixers.proxymix.toy.ToyEnv` is a synthetic check.

Deliberate simplifications (numbered):

1. REINFORCE with a per-decision moving-average baseline, not PPO (clip 0.2, GAE 0.95).
2. One policy-gradient step per episode (no minibatching over episodes).
3. The terminal bonus uses accuracy by default (``terminal_metric: loss`` for tiny proxies whose
   accuracy stays near zero).
"""

from __future__ import annotations

import json
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mixtune.errors import ConfigError
from mixtune.mixers.proxymix import controller as ctl
from mixtune.mixers.proxymix.features import reward
from mixtune.mixers.proxymix.setting import LearnConfig


@dataclass
class Decision:
    x: np.ndarray  # (n, F) slot features
    g: np.ndarray  # (G,) global features
    mask: np.ndarray  # (n,) accessible slots
    action: np.ndarray  # (n,) the sampled logits
    reward: float


def decisions(trajectories: list[list[dict]], lc: LearnConfig) -> list[Decision]:
    """Learnable decisions of an episode (one trajectory per stage), with their rewards."""
    out = []
    for traj in trajectories:
        for prev, now in zip(traj, traj[1:]):
            if prev.get("action") is None or sum(prev["mask"]) < 2:
                continue
            out.append(
                Decision(
                    np.asarray(prev["x"], np.float32),
                    np.asarray(prev["g"], np.float32),
                    np.asarray(prev["mask"], bool),
                    np.asarray(prev["action"], np.float64),
                    reward(prev, now, lc.lambda_forget, lc.lambda_safety),
                )
            )
    return out


def terminal(result: dict, lc: LearnConfig) -> float:
    """End-of-sequence bonus: AA - lambda_F F + lambda_S safety (or its loss-based analogue)."""
    saf = result.get("safety") or {}
    if lc.terminal_metric == "accuracy":
        return (
            (result.get("average_accuracy") or 0.0)
            - lc.lambda_F * (result.get("forgetting") or 0.0)
            + lc.lambda_S * (saf.get("final") or 0.0)
        )
    unsafe = saf["loss"][-1] / saf["start_loss"] - 1 if saf.get("start_loss") else 0.0
    return (
        -(result["final_loss_ratio"] - 1)
        - lc.lambda_F * (result["loss_forgetting"] or 0.0)
        - lc.lambda_S * unsafe
    )


class Learner:
    """REINFORCE with a moving-average baseline over a :class:`~controller.Controller`."""

    def __init__(self, lc: LearnConfig, seed: int):
        self.lc = lc
        self.net = ctl.new(seed, lc.hidden, lc.layers)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lc.lr)
        self.baseline: dict[str, list[float]] = {}
        self.episode = 0
        self.history: list[dict] = []
        self.vulnerability: dict[str, list[float]] = {}
        self.cost = {"seconds": 0.0, "train_flops": 0.0, "params": 0}

    def update(self, ds: list[Decision], bonus: float, key: str = "") -> dict:
        """One policy-gradient step on an episode; ``key`` names its sequence (the baseline is
        kept per sequence and decision index)."""
        lc = self.lc
        r = np.array([d.reward for d in ds], np.float64)
        if len(r) == 0:
            return {"return": bonus, "baseline": None, "loss": 0.0}
        r[-1] += lc.terminal_weight * bonus
        G = np.zeros_like(r)
        acc = 0.0
        for t in range(len(r) - 1, -1, -1):
            acc = r[t] + lc.gamma * acc
            G[t] = acc
        base = self.baseline.setdefault(key, [])
        while len(base) < len(G):  # first visit of a decision index: its own return
            base.append(float(G[len(base)]))
        b = np.array(base[: len(G)])
        adv = G - b if lc.baseline == "moving_average" else G - G.mean()
        if lc.normalize_advantages and len(adv) > 1 and adv.std() > 1e-8:
            adv = adv / adv.std()
        logps = []
        for d in ds:
            mask = torch.as_tensor(d.mask)
            z = self.net(torch.as_tensor(d.x), torch.as_tensor(d.g), mask).double()
            diff = (torch.as_tensor(d.action) - z)[mask]
            logps.append(-(diff**2).sum() / (2 * lc.sigma**2))
        loss = -(torch.as_tensor(adv) * torch.stack(logps)).mean()
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        m = lc.baseline_momentum
        for t, g in enumerate(G):
            base[t] = m * base[t] + (1 - m) * float(g)
        return {"return": float(r.sum()), "baseline": float(b[0]), "loss": float(loss.detach())}

    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(),
            "opt": self.opt.state_dict(),
            "baseline": {k: list(v) for k, v in self.baseline.items()},
            "episode": self.episode,
            "history": list(self.history),
            "vulnerability": dict(self.vulnerability),
            "cost": dict(self.cost),
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.baseline = {k: list(v) for k, v in state["baseline"].items()}
        self.episode = state["episode"]
        self.history = list(state["history"])
        self.vulnerability = {k: list(v) for k, v in state["vulnerability"].items()}
        self.cost = dict(state["cost"])

    def mean_vulnerability(self) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in self.vulnerability.items() if v}


def _load_state(path: Path) -> dict:
    """The saved learner state: tensors and plain data only (``weights_only``), so a file that
    holds anything else, whose unpickling could run code, is refused instead of run."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(
            f"{path} is damaged or holds more than tensors and plain data (unpickling it could "
            "run code), so it was not loaded; delete it to learn from the first episode"
        ) from None


def train(env, lc: LearnConfig, seed: int, ldir: str | Path, echo=print) -> Learner:
    """Run (or resume) ``lc.episodes`` episodes of ``env``; learner state in ``ldir``."""
    ldir = Path(ldir)
    ldir.mkdir(parents=True, exist_ok=True)
    learner = Learner(lc, seed)
    state_path = ldir / "learner.pt"
    if state_path.is_file():
        learner.load_state_dict(_load_state(state_path))
        if learner.episode < lc.episodes:
            echo(f"[learn] resuming at episode {learner.episode + 1}/{lc.episodes}")
    for e in range(learner.episode, lc.episodes):
        t0 = time.perf_counter()
        ep = env.episode(learner, e)
        stats = learner.update(
            decisions(ep["trajectories"], lc), ep["terminal"], ">".join(ep.get("order", ()))
        )
        for k, v in ep.get("vulnerability", {}).items():
            learner.vulnerability.setdefault(k, []).append(float(v))
        cost = ep.get("cost", {})
        learner.cost["seconds"] += cost.get("seconds", time.perf_counter() - t0)
        learner.cost["train_flops"] += cost.get("train_flops", 0.0)
        learner.cost["params"] = cost.get("params", learner.cost["params"])
        entry = {
            "episode": e,
            "order": list(ep.get("order", [])),
            **stats,
            "terminal": ep["terminal"],
            **ep.get("metrics", {}),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        learner.history.append(entry)
        learner.episode = e + 1
        tmp = state_path.with_name("learner.pt.tmp")
        torch.save(learner.state_dict(), tmp)
        os.replace(tmp, state_path)
        (ldir / "returns.jsonl").write_text("".join(json.dumps(h) + "\n" for h in learner.history))
        extra = " ".join(
            f"{k}={v:.3f}" for k, v in ep.get("metrics", {}).items() if isinstance(v, float)
        )
        base = "-" if stats["baseline"] is None else f"{stats['baseline']:+.3f}"
        echo(
            f"[learn] episode {e + 1}/{lc.episodes} {'>'.join(entry['order'])} "
            f"return={stats['return']:+.3f} baseline={base} {extra} ({entry['seconds']:.1f}s)"
        )
    return learner
