"""REINFORCE (and a clipped PPO option) for the ProxyMix controller.

An environment plays episodes with the learner's network (``env.play(net, spec)``, see
:mod:`mixtune.mixers.proxymix.episodes`) -> per-stage trajectories of mixer observations and
a terminal bonus. Per decision u (note §2.2 P6-P7, [PROPOSAL]):

    r_u = gain of the current task - lambda_forget sum(buffer loss increases)
          - lambda_safety (safety loss increase)                (ratio units, features.reward)
    r_last += terminal_weight (AA - lambda_F F + lambda_S safety)   (end-of-sequence bonus)
    G_u = sum_{k >= u} gamma^(k-u) r_k;  A_u = (G_u - b_u) / std(A)
    loss = -mean_u A_u log N(a_u; z_theta(x_u), sigma^2)

Faithful mode (the defaults): one episode per update, b a moving average per sequence and
decision index (b_u <- m b_u + (1-m) G_u), one Adam step. At the benchmark's episode noise
(return sd ~0.65 on the proxy) that learner does not learn (issue 21), so variance reduction is
offered as options, each a deviation from the note:

- ``episodes_per_update`` B > 1: one step on the mean loss over B episodes, which share one
  data seed (common random numbers);
- ``antithetic``: the episodes come in pairs with mirrored exploration noise (eps, -eps);
- ``baseline: batch``: b_u = mean G_u of the update's episodes of the same sequence (with
  antithetic pairs: the pair's mean, so A = (G(eps) - G(-eps)) / 2, a finite difference along
  the noise); it is a per-state baseline, since those episodes start from the same state and
  data;
- ``normalize_rewards``: rewards divided by the running std of the episode returns;
- advantages are normalised over the whole batch (not per episode), so an update with a clear
  difference weighs more than one with none;
- ``algorithm: ppo``: ``ppo_epochs`` steps on the clipped surrogate
  min(rho A, clip(rho, 1 - ppo_clip, 1 + ppo_clip) A), rho = pi_new(a) / pi_old(a).

Decisions where only the current task is accessible are forced and not learned from. The
learner state (network, optimizer, baselines, history, greedy curve, cost) is saved after
every update, so an interrupted run resumes at the next update (a half-done update is redone;
episodes are deterministic in their spec). Environments:
:class:`mixtune.mixers.proxymix.learn.LMEnv` trains real models;
:class:`mixtune.mixers.proxymix.toy.ToyEnv` is a synthetic check with a known optimum.

Deliberate simplifications (numbered):

1. Faithful mode is REINFORCE with a per-decision moving-average baseline, not PPO; PPO here
   has a fixed exploration sigma and no GAE (no value network).
2. The terminal bonus uses accuracy by default (``terminal_metric: loss`` for tiny proxies whose
   accuracy stays near zero; ``loss_learned``, a deviation, credits how far each task was
   learned as AA does, not only how well it was kept: :func:`learned`).
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
from mixtune.mixers.proxymix import episodes as eps
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
    """End-of-sequence bonus: AA - lambda_F F + lambda_S safety (or its loss-based analogue).

    ``terminal_metric: loss`` takes -(final_loss_ratio - 1) as the AA term: each task's final
    loss over its loss right after its stage, which scores retention only. ``loss_learned``
    takes :func:`learned` instead (``result["records"]``: the stages' mixer trajectories).
    """
    saf = result.get("safety") or {}
    if lc.terminal_metric == "accuracy":
        return (
            (result.get("average_accuracy") or 0.0)
            - lc.lambda_F * (result.get("forgetting") or 0.0)
            + lc.lambda_S * (saf.get("final") or 0.0)
        )
    unsafe = saf["loss"][-1] / saf["start_loss"] - 1 if saf.get("start_loss") else 0.0
    if lc.terminal_metric == "loss_learned":
        aa = learned([r["trajectory"] for r in result["records"]])
    else:
        aa = -(result["final_loss_ratio"] - 1)
    return aa - lc.lambda_F * (result["loss_forgetting"] or 0.0) - lc.lambda_S * unsafe


def learned(trajectories: list[list[dict]]) -> float:
    """The loss analogue of AA: mean_i (1 - L_final(i) / L_before(i)) over the tasks.

    From the mixer's ratios (one trajectory per stage): at the end of stage i its task's ratio
    is L(i after stage i) / L(i before it), and at the end of the last stage the ratio of
    buffer i is L_final(i) / L(i after stage i) (the reference was rebased when stage i
    ended), so their product is the final loss over the loss before the task was learned.
    """
    if not trajectories or any(not t for t in trajectories):
        raise ValueError("terminal_metric loss_learned needs every stage's mixer trajectory")
    last = trajectories[-1][-1]["ratios"]
    out = []
    for s, traj in enumerate(trajectories):
        end = traj[-1]
        task = end["current"]
        kept = 1.0 if s == len(trajectories) - 1 else last[task]
        out.append(1.0 - end["ratios"][task] * kept)
    return float(np.mean(out))


def episode_return(ep: dict, lc: LearnConfig) -> float:
    """The return the learner maximises: the decisions' rewards plus the weighted bonus."""
    return float(
        sum(d.reward for d in decisions(ep["trajectories"], lc))
        + lc.terminal_weight * ep["terminal"]
    )


def returns_to_go(r: np.ndarray, gamma: float) -> np.ndarray:
    G = np.zeros_like(r)
    acc = 0.0
    for t in range(len(r) - 1, -1, -1):
        acc = r[t] + gamma * acc
        G[t] = acc
    return G


class Learner:
    """REINFORCE (or clipped PPO) over a :class:`~controller.Controller`."""

    def __init__(self, lc: LearnConfig, seed: int):
        self.lc = lc
        self.net = ctl.new(seed, lc.hidden, lc.layers)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lc.lr)
        self.baseline: dict[str, list[float]] = {}
        self.episode = 0
        self.history: list[dict] = []
        self.greedy: list[dict] = []
        self.scale = [0, 0.0, 0.0]  # Welford count, mean, M2 of episode returns
        self.vulnerability: dict[str, list[float]] = {}
        self.cost = {"seconds": 0.0, "train_flops": 0.0, "params": 0}

    @property
    def faithful(self) -> bool:
        """One episode, one REINFORCE step, moving-average baseline: the note's learner."""
        lc = self.lc
        return (
            lc.episodes_per_update == 1
            and lc.algorithm == "reinforce"
            and lc.baseline != "batch"
            and not lc.normalize_rewards
        )

    def update(self, ds: list[Decision], bonus: float, key: str = "") -> dict:
        """One policy-gradient step on an episode; ``key`` names its sequence (the baseline is
        kept per sequence and decision index)."""
        lc = self.lc
        r = np.array([d.reward for d in ds], np.float64)
        if len(r) == 0:
            return {"return": bonus, "baseline": None, "loss": 0.0}
        r[-1] += lc.terminal_weight * bonus
        G = returns_to_go(r, lc.gamma)
        base = self.baseline.setdefault(key, [])
        while len(base) < len(G):  # first visit of a decision index: its own return
            base.append(float(G[len(base)]))
        b = np.array(base[: len(G)])
        adv = G - b if lc.baseline == "moving_average" else G - G.mean()
        if lc.normalize_advantages and len(adv) > 1 and adv.std() > 1e-8:
            adv = adv / adv.std()
        loss = -(torch.as_tensor(adv) * self._logps(ds)).mean()
        self._step(loss)
        m = lc.baseline_momentum
        for t, g in enumerate(G):
            base[t] = m * base[t] + (1 - m) * float(g)
        return {"return": float(r.sum()), "baseline": float(b[0]), "loss": float(loss.detach())}

    def update_batch(self, episodes: list[tuple[list[Decision], float, str]]) -> dict:
        """One update on several episodes ``(decisions, terminal bonus, sequence key)``."""
        lc = self.lc
        rows = []
        for ds, bonus, key in episodes:
            r = np.array([d.reward for d in ds], np.float64)
            if len(r):
                r[-1] += lc.terminal_weight * bonus
            rows.append((ds, returns_to_go(r, lc.gamma), key, float(r.sum()) if len(r) else bonus))
        for *_, ret in rows:  # running scale of the returns (Welford)
            n, mean, m2 = self.scale
            n += 1
            d = ret - mean
            mean += d / n
            self.scale = [n, mean, m2 + d * (ret - mean)]
        n, _, m2 = self.scale
        scale = float(np.sqrt(m2 / (n - 1))) if lc.normalize_rewards and n > 1 else 1.0
        scale = scale if scale > 1e-8 else 1.0
        advs, firsts = [], []
        for ds, G, key, _ in rows:
            if lc.baseline == "batch":
                peers = [g for _, g, k, _ in rows if k == key]
                b = np.array([np.mean([g[t] for g in peers if len(g) > t]) for t in range(len(G))])
            elif lc.baseline == "moving_average":
                base = self.baseline.setdefault(key, [])
                while len(base) < len(G):
                    base.append(float(G[len(base)]))
                b = np.array(base[: len(G)])
            else:
                b = np.full(len(G), G.mean() if len(G) else 0.0)
            advs.append((G - b) / scale)
            firsts.append(float(b[0]) if len(b) else None)
        if lc.baseline == "moving_average":  # after all advantages: the update's own baseline
            m = lc.baseline_momentum
            for _, G, key, _ in rows:
                base = self.baseline[key]
                for t, g in enumerate(G):
                    base[t] = m * base[t] + (1 - m) * float(g)
        ds_all = [d for ds, *_ in rows for d in ds]
        adv = np.concatenate(advs) if advs else np.zeros(0)
        stats = {
            "return": float(np.mean([ret for *_, ret in rows])),
            "baseline": next((f for f in firsts if f is not None), None),
            "loss": 0.0,
        }
        if not len(adv):
            return stats
        if lc.normalize_advantages and len(adv) > 1 and adv.std() > 1e-8:
            adv = adv / adv.std()
        A = torch.as_tensor(adv)
        if lc.algorithm == "reinforce":
            loss = -(A * self._logps(ds_all)).mean()
            self._step(loss)
        else:  # clipped PPO on the batch, several epochs
            with torch.no_grad():
                old = self._logps(ds_all)
            for _ in range(lc.ppo_epochs):
                rho = torch.exp(self._logps(ds_all) - old)
                clipped = torch.clamp(rho, 1 - lc.ppo_clip, 1 + lc.ppo_clip)
                loss = -torch.minimum(rho * A, clipped * A).mean()
                self._step(loss)
        stats["loss"] = float(loss.detach())
        return stats

    def _logps(self, ds: list[Decision]) -> torch.Tensor:
        """log N(a; z_theta(x), sigma^2) of each decision's action, up to a constant."""
        logps = []
        for d in ds:
            mask = torch.as_tensor(d.mask)
            z = self.net(torch.as_tensor(d.x), torch.as_tensor(d.g), mask).double()
            diff = (torch.as_tensor(d.action) - z)[mask]
            logps.append(-(diff**2).sum() / (2 * self.lc.sigma**2))
        return torch.stack(logps)

    def _step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()

    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(),
            "opt": self.opt.state_dict(),
            "baseline": {k: list(v) for k, v in self.baseline.items()},
            "episode": self.episode,
            "history": list(self.history),
            "greedy": list(self.greedy),
            "scale": list(self.scale),
            "vulnerability": dict(self.vulnerability),
            "cost": dict(self.cost),
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.baseline = {k: list(v) for k, v in state["baseline"].items()}
        self.episode = state["episode"]
        self.history = list(state["history"])
        self.greedy = list(state.get("greedy", []))
        self.scale = list(state.get("scale", [0, 0.0, 0.0]))
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


def evaluate_greedy(env, learner: Learner, update: int, echo=print) -> dict:
    """Play the held-out episodes greedily; append (and return) a point of the curve."""
    lc, t0 = learner.lc, time.perf_counter()
    specs = eps.held_out_specs(lc, len(env.orders), len(learner.greedy))
    returns = [episode_return(env.play(learner.net, s), lc) for s in specs]
    untrained = learner.greedy[0]["returns"] if learner.greedy else None
    point = eps.greedy_point(returns, untrained, update, learner.episode)
    learner.greedy.append(point)
    learner.cost["eval_seconds"] = learner.cost.get("eval_seconds", 0.0) + (
        time.perf_counter() - t0
    )
    gain = "" if "gain" not in point else f" gain vs untrained {point['gain']:+.3f}"
    se = "" if point.get("gain_se") is None else f" (se {point['gain_se']:.3f})"
    echo(
        f"[learn] greedy on {len(returns)} held-out episodes after {learner.episode} episodes: "
        f"return {point['mean']:+.3f}{gain}{se}"
    )
    return point


def train(env, lc: LearnConfig, seed: int, ldir: str | Path, echo=print) -> Learner:
    """Run (or resume) ``lc.episodes`` episodes of ``env``; learner state in ``ldir``.

    Episodes are played in updates of ``lc.episodes_per_update``; with ``lc.eval_every`` the
    greedy policy is evaluated on held-out episodes before the first update, every
    ``eval_every`` updates and after the last (``greedy.json/.csv/.png`` in ``ldir``).
    """
    ldir = Path(ldir)
    ldir.mkdir(parents=True, exist_ok=True)
    learner = Learner(lc, seed)
    state_path = ldir / "learner.pt"
    B = lc.episodes_per_update
    n_updates = -(-lc.episodes // B)
    if state_path.is_file():
        learner.load_state_dict(_load_state(state_path))
        if learner.episode < lc.episodes:
            echo(f"[learn] resuming at episode {learner.episode + 1}/{lc.episodes}")

    def save():
        tmp = state_path.with_name("learner.pt.tmp")
        torch.save(learner.state_dict(), tmp)
        os.replace(tmp, state_path)
        (ldir / "returns.jsonl").write_text("".join(json.dumps(h) + "\n" for h in learner.history))
        if lc.eval_every:
            eps.write_curve(learner.greedy, ldir)

    if lc.eval_every and not learner.greedy:
        evaluate_greedy(env, learner, 0, echo)
        save()
    for u in range(learner.episode // B, n_updates):
        t0 = time.perf_counter()
        played = [(s, env.play(learner.net, s)) for s in eps.update_specs(u, lc, len(env.orders))]
        batch = [
            (decisions(ep["trajectories"], lc), ep["terminal"], ">".join(ep.get("order", ())))
            for _, ep in played
        ]
        stats = learner.update(*batch[0]) if learner.faithful else learner.update_batch(batch)
        seconds = round((time.perf_counter() - t0) / len(played), 2)
        for spec, ep in played:
            for k, v in ep.get("vulnerability", {}).items():
                learner.vulnerability.setdefault(k, []).append(float(v))
            cost = ep.get("cost", {})
            learner.cost["seconds"] += cost.get("seconds", seconds)
            learner.cost["train_flops"] += cost.get("train_flops", 0.0)
            learner.cost["params"] = cost.get("params", learner.cost["params"])
            ret = stats["return"] if learner.faithful else episode_return(ep, lc)
            entry = {
                "episode": spec.index,
                "update": u,
                "order": list(ep.get("order", [])),
                **stats,
                "return": ret,
                "update_return": stats["return"],
                "mirror": spec.mirror,
                "terminal": ep["terminal"],
                **ep.get("metrics", {}),
                "seconds": seconds,
            }
            learner.history.append(entry)
            extra = " ".join(
                f"{k}={v:.3f}" for k, v in ep.get("metrics", {}).items() if isinstance(v, float)
            )
            base = "-" if stats["baseline"] is None else f"{stats['baseline']:+.3f}"
            echo(
                f"[learn] episode {spec.index + 1}/{lc.episodes} {'>'.join(entry['order'])} "
                f"return={ret:+.3f} baseline={base} {extra} ({seconds:.1f}s)"
            )
        learner.episode = (u + 1) * B
        if lc.eval_every and ((u + 1) % lc.eval_every == 0 or u + 1 == n_updates):
            evaluate_greedy(env, learner, u + 1, echo)
        save()
    return learner
