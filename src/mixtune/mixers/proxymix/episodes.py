"""Which episodes the ProxyMix learner plays, and the greedy policy's held-out learning curve.

An :class:`EpisodeSpec` says everything an environment needs to play one episode: the task
order, the data seed (data order and replay buffers), the exploration seed, the noise scale and
whether the noise is mirrored. Environments (:class:`mixtune.mixers.proxymix.learn.LMEnv`,
:class:`mixtune.mixers.proxymix.toy.ToyEnv`) implement ``play(net, spec) -> episode``.

Training episodes come in updates of ``learn.episodes_per_update`` (default 1: the faithful
one-episode REINFORCE step). Within an update every episode shares one data seed (common
random numbers: the returns of an update differ by the policy's actions, not by the data); with
``learn.antithetic`` they come in pairs that share the order and the exploration seed, the
second with the noise negated (eps, -eps), so the pair's mean return is a baseline that holds
everything but the exploration's direction.

Held-out episodes (``learn.eval_every``) are played greedily (no exploration noise) on data
seeds that training never uses, the same ones at every evaluation, so the curve compares
policies on identical episodes: its standard errors are those of the paired differences to the
untrained controller (evaluation 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HELD_OUT = 1_000_000
"""Held-out episodes use data seeds and indices from here on (training never reaches it)."""


@dataclass(frozen=True)
class EpisodeSpec:
    index: int
    """Episode number (training: 0, 1, ...; held-out: ``HELD_OUT + k``)."""
    order: int
    """Index into the environment's task orders."""
    data_seed: int | None
    """Data order and buffers; None: the config's own seed (the same data for every episode)."""
    explore_seed: int
    """Seed of the Gaussian exploration noise on the controller's logits."""
    sigma: float
    """Std of that noise (0: the greedy, deterministic policy)."""
    mirror: bool = False
    """Negate the noise (the antithetic twin of the episode with the same ``explore_seed``)."""


def faithful(e: int, lc, n_orders: int) -> EpisodeSpec:
    """Episode ``e`` of the one-episode-per-update learner (sequences rotate)."""
    return EpisodeSpec(e, e % n_orders, e if lc.vary_data_seed else None, e, lc.sigma)


def update_specs(u: int, lc, n_orders: int) -> list[EpisodeSpec]:
    """The episodes of update ``u`` (episode indices ``u B .. u B + B - 1``)."""
    B = lc.episodes_per_update
    if B == 1:
        return [faithful(u, lc, n_orders)]
    data = u if lc.vary_data_seed else None  # shared by the whole update (common random numbers)
    out = []
    for j in range(B):
        e = u * B + j
        if lc.antithetic:  # pairs: same order and noise seed, the second mirrored
            first = u * B + 2 * (j // 2)
            out.append(
                EpisodeSpec(e, (first // 2) % n_orders, data, first, lc.sigma, mirror=j % 2 == 1)
            )
        else:
            out.append(EpisodeSpec(e, e % n_orders, data, e, lc.sigma))
    return out


def held_out_specs(lc, n_orders: int, round_: int = 0) -> list[EpisodeSpec]:
    """The greedy evaluation's episodes: every order in turn, each on unseen data. The
    exploration seed (unused at sigma 0) carries the evaluation round, so an environment whose
    episodes have noise of their own beyond the data (the toy's) draws it afresh each round."""
    return [
        EpisodeSpec(HELD_OUT + k, k % n_orders, HELD_OUT + k, round_, 0.0)
        for k in range(lc.eval_episodes)
    ]


def greedy_point(returns: list[float], untrained: list[float] | None, update: int, episodes: int):
    """One point of the held-out curve: mean return, its standard error, and the paired
    improvement over the untrained controller with its standard error."""
    r = np.asarray(returns, np.float64)
    n = len(r)
    point = {
        "update": update,
        "episodes": episodes,
        "returns": [float(x) for x in r],
        "mean": float(r.mean()),
        "se": float(r.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
    }
    if untrained is not None:
        d = r - np.asarray(untrained, np.float64)
        point["gain"] = float(d.mean())
        point["gain_se"] = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else None
    return point


def write_curve(points: list[dict], ldir: Path) -> None:
    """``greedy.json`` (every point), ``greedy.csv`` (one row per point) and ``greedy.png``."""
    (ldir / "greedy.json").write_text(json.dumps(points, indent=1))
    rows = ["update,episodes,mean,se,gain,gain_se"]
    for p in points:
        rows.append(
            ",".join(
                "" if p.get(k) is None else str(p[k])
                for k in ("update", "episodes", "mean", "se", "gain", "gain_se")
            )
        )
    (ldir / "greedy.csv").write_text("\n".join(rows) + "\n")
    if not points:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p["episodes"] for p in points]
    m = np.array([p["mean"] for p in points])
    se = np.array([p["se"] or 0.0 for p in points])
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.errorbar(x, m, yerr=2 * se, fmt="o-", capsize=3, label="greedy policy, held-out")
    ax.set_xlabel("training episodes")
    ax.set_ylabel("return (mean +- 2 se)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ldir / "greedy.png", dpi=90)
    plt.close(fig)
