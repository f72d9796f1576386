"""A synthetic continual environment whose best replay policy is known (no language model).

Stage s (0-based) has slots [task s, buffers of tasks 0..s-1]; each stage has ``decisions``
decisions. With weights pi at a decision, losses move by (k = ``rate``, refs L^ref):

    current task:  L_c <- L_c - k g pi_c L_c^ref                     (learning)
    buffer i:      L_i <- L_i + k L_i^ref (v pi_c - rho pi_i)         (forgetting vs. replay)

With ``noise`` > 0 the episode's terminal bonus gets a zero-mean term
noise * (sqrt(c) eps_data + sqrt(1 - c) eps_own) (c = ``shared``): eps_data depends only on the
episode's data seed (what common random numbers can hold fixed), eps_own on the episode itself
(the part that differs even on the same data, as a real model's trajectory diverges once its
mixture differs). It enters every decision's return-to-go, as the benchmark proxy's end-of-
sequence noise does, and leaves the expected return of every policy (so the optimum) unchanged;
``noise=0.65`` is the proxy's measured episode return sd (issue 21).

Without noise, the ProxyMix reward of a decision (features.reward, lambda_forget = 1) is
k [g pi_c - sum_i max(0, v pi_c - rho pi_i)]. With g < n_b v + rho (n_b buffers) it is
maximised by equal buffer shares and pi_c* = max(p_min, rho / (n_b v + rho)): with the defaults
(g = 2, v = 2, rho = 1) that is a replay share of 2/3 with one buffer and 0.7 with two.
Observations, features and rewards go through the same code as the real mixer, so the learner
sees exactly what it would see on a model. Everything is deterministic in (seed, episode).
"""

from __future__ import annotations

import numpy as np
import torch

from mixtune.mixers.proxymix.features import (
    Tracker,
    global_features,
    masked_policy,
    reward,
    slot_features,
)


class ToyEnv:
    def __init__(
        self,
        stages: int = 3,
        decisions: int = 5,
        gain: float = 2.0,
        vulnerability: float = 2.0,
        recovery: float = 1.0,
        rate: float = 0.05,
        p_min: float = 0.3,
        beta: float = 0.9,
        seed: int = 0,
        noise: float = 0.0,
        shared: float = 0.5,
    ):
        self.S, self.D = stages, decisions
        self.g, self.v, self.rho, self.k = gain, vulnerability, recovery, rate
        self.p_min, self.beta, self.seed = p_min, beta, seed
        self.noise, self.shared = noise, shared
        self.orders = [tuple(f"t{i}" for i in range(stages))]

    def best_weights(self, n_buffers: int) -> np.ndarray:
        """The known optimum: [pi_c, buffer shares...] for ``n_buffers`` buffers."""
        if n_buffers == 0:
            return np.ones(1)
        pc = max(self.p_min, self.rho / (n_buffers * self.v + self.rho))
        return np.array([pc] + [(1 - pc) / n_buffers] * n_buffers)

    def rollout(self, act, e: int = 0, data_seed: int | None = None) -> list[list[dict]]:
        """One episode; ``act(obs, rng) -> (weights, action logits or None)``; ``e`` keys the
        exploration noise (the dynamics are noise-free; ``data_seed`` is unused by them)."""
        names = list(self.orders[0])
        tracker = Tracker(self.beta)
        loss = {n: 2.0 + 0.25 * i for i, n in enumerate(names)}  # arbitrary scales
        trajs = []
        for s in range(self.S):
            slots = [names[s]] + names[:s]
            traj = []
            for u in range(self.D + 1):
                per = [tracker.observe(n, loss[n]) for n in slots]
                kinds = ["current"] + ["buffer"] * s
                ages = [0.0] + [(s - i) / self.S for i in range(s)]
                x = slot_features(per, kinds, ages, u / self.D, (s + 1) / self.S)
                obs = {
                    "step": u,
                    "slots": slots,
                    "mask": [True] * len(slots),
                    "current": slots[0],
                    "x": x.tolist(),
                    "g": global_features(None).tolist(),
                    "buffers": slots[1:],
                    "ratios": {n: p[0] for n, p in zip(slots, per)},
                    "safety": None,
                    "action": None,
                    "weights": None,
                }
                traj.append(obs)
                if u == self.D:  # end-of-stage observation
                    break
                rng = np.random.default_rng([self.seed, e, s, u])
                w, action = act(obs, rng)
                obs.update(weights=list(map(float, w)), action=action)
                ref = {n: tracker.slots[n]["ref"] for n in slots}
                loss[slots[0]] -= self.k * self.g * w[0] * ref[slots[0]]
                for j, n in enumerate(slots[1:], start=1):
                    loss[n] += self.k * ref[n] * (self.v * w[0] - self.rho * w[j])
            tracker.rebase(names[s], loss[names[s]])  # learned: it becomes a buffer
            trajs.append(traj)
        return trajs

    def controller_act(self, net, sigma: float, mirror: bool = False):
        sign = -1.0 if mirror else 1.0

        def act(obs, rng):
            x = torch.as_tensor(np.asarray(obs["x"], np.float32))
            g = torch.as_tensor(np.asarray(obs["g"], np.float32))
            mask = torch.as_tensor(np.asarray(obs["mask"]))
            with torch.no_grad():
                z = net(x, g, mask).double()
            if sigma > 0:
                z = z + sign * sigma * torch.as_tensor(rng.standard_normal(len(z)))
            return masked_policy(z, mask, 0, self.p_min).numpy(), z.tolist()

        return act

    def oracle_act(self, obs, rng):
        return self.best_weights(len(obs["slots"]) - 1), None

    def play(self, net, spec) -> dict:
        """An episode of :class:`~mixtune.mixers.proxymix.episodes.EpisodeSpec` ``spec``."""
        act = self.controller_act(net, spec.sigma, spec.mirror)
        trajs = self.rollout(act, spec.explore_seed, spec.data_seed)
        return {"order": self.orders[0], "trajectories": trajs, "terminal": self.bonus(spec)}

    def bonus(self, spec) -> float:
        """The terminal noise of an episode (0 without ``noise``)."""
        if self.noise == 0:
            return 0.0
        d = -1 if spec.data_seed is None else spec.data_seed
        a = np.random.default_rng([self.seed, 1, d + 1]).standard_normal()
        own = [self.seed, 2, spec.index, spec.explore_seed, int(spec.mirror)]
        b = np.random.default_rng(own).standard_normal()
        return float(self.noise * (np.sqrt(self.shared) * a + np.sqrt(1 - self.shared) * b))

    def episode(self, learner, e: int) -> dict:
        """Episode ``e`` of the faithful learner."""
        from mixtune.mixers.proxymix.episodes import faithful

        return self.play(learner.net, faithful(e, learner.lc, len(self.orders)))

    def value(self, act, lambda_forget: float = 1.0, **rollout) -> float:
        """Total reward of the decisions with a choice (stages >= 1) under ``act``."""
        total = 0.0
        for traj in self.rollout(act, **rollout):
            for prev, now in zip(traj, traj[1:]):
                if len(prev["slots"]) > 1:
                    total += reward(prev, now, lambda_forget, 0.0)
        return total
