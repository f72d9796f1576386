"""Learning the ProxyMix controller on a proxy model (``mixtune proxymix learn``).

The proxy is the config with ``learn.proxy`` deep-merged over it (a smaller model, its own
warm-up, shorter stages). One episode is one continual run of the proxy over one task sequence
(sequences rotate) with Gaussian exploration noise on the controller's logits;
:mod:`mixtune.mixers.proxymix.reinforce` turns its trajectories into one policy-gradient step.
By default every episode of a sequence sees the same data order and buffers (only the
exploration noise changes with the episode), so the moving-average baseline removes the data
noise from the advantages. At the end the proxy side of the pre-transfer check runs and the
controller is frozen to a file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from mixtune.config import MethodConfig
from mixtune.continual.driver import run_sequence, warmup
from mixtune.mixers.proxymix import controller as ctl
from mixtune.mixers.proxymix import episodes, transfer
from mixtune.mixers.proxymix.reinforce import Learner, terminal, train
from mixtune.mixers.proxymix.setting import ProxyMixSetting, proxy_setting


class LMEnv:
    """Episodes on a real (proxy) model: one continual run per episode, via the driver."""

    def __init__(self, pc: ProxyMixSetting, ldir: Path):
        self.pc, self.ldir = pc, ldir
        self.orders = pc.orders()
        self.start = warmup(pc, ldir / "warmup")
        params = pc.mixer.params if pc.mixer.name == "proxymix" else {}
        self.params = {
            k: v
            for k, v in params.items()
            if k not in ("policy", "controller", "explore_sigma", "explore_seed")
        }

    def episode(self, learner: Learner, e: int) -> dict:
        """Episode ``e`` of the faithful learner (one episode per update)."""
        return self.play(learner.net, episodes.faithful(e, learner.lc, len(self.orders)))

    def play(self, net, spec: episodes.EpisodeSpec) -> dict:
        """One continual run of the proxy with ``net`` as the controller, as ``spec`` says."""
        policy = ctl.save(self.ldir / "policy.pt", net)
        order = self.orders[spec.order]
        edir = self.ldir / "episodes" / f"ep-{spec.index:04d}{'-m' if spec.mirror else ''}"
        shutil.rmtree(edir, ignore_errors=True)  # a half-done episode is redone from scratch
        lc = self.pc.learn
        mixer = MethodConfig(
            "proxymix",
            {
                **self.params,
                "policy": "controller",
                "controller": str(policy),
                "explore_sigma": spec.sigma,
                "explore_seed": episode_seed(self.pc.seed, spec.explore_seed),
                "explore_mirror": spec.mirror,
            },
        )
        data = None if spec.data_seed is None else episode_seed(self.pc.seed, spec.data_seed)
        res = run_sequence(
            self.pc,
            order,
            edir,
            mixer=mixer,
            seed=self.pc.seed if data is None else data,
            start_model=self.start,
        )
        if not lc.keep_episodes:
            shutil.rmtree(edir, ignore_errors=True)
        saf = res.get("safety") or {}
        return {
            "order": order,
            "trajectories": [r["trajectory"] for r in res["records"]],
            "terminal": terminal(res, lc),
            "vulnerability": res["vulnerability"],
            "cost": res["cost"],
            "metrics": {
                "AA": res["average_accuracy"],
                "F": res["forgetting"],
                "safety": saf.get("final"),
                "loss_F": res["loss_forgetting"],
            },
        }


def episode_seed(seed: int, e: int) -> int:
    return 10007 * seed + e + 1


def learn(cc: ProxyMixSetting, echo=print) -> Path:
    """Learn a controller on the proxy (``learn.proxy`` over ``cc``) and freeze it to a file."""
    lc = cc.learn
    pc = proxy_setting(cc)
    ldir = Path(lc.output_dir or Path(cc.output_dir) / "learn")
    ldir.mkdir(parents=True, exist_ok=True)
    env = LMEnv(pc, ldir)
    learner = train(env, lc, cc.seed, ldir, echo)
    n = max(learner.episode, 1)
    probe = {}
    if cc.transfer.check:  # the proxy side of the pre-transfer check (same probe as the target)
        probe = transfer.probe(pc, ldir / "transfer-probe", env.start)
        echo(
            f"[learn] proxy vulnerability (fixed-replay probe): "
            f"{ {k: round(v, 3) for k, v in probe['vulnerability'].items()} }"
        )
    meta = {
        "episodes": learner.episode,
        "seed": cc.seed,
        "proxy_model": _model_name(pc),
        "episode_vulnerability": learner.mean_vulnerability(),
        "proxy_params": learner.cost["params"],
        "steps_per_stage": pc.steps_per_stage,
        "cost": {
            **learner.cost,
            "seconds_per_episode": learner.cost["seconds"] / n,
            "train_flops_per_episode": learner.cost["train_flops"] / n,
        },
        "returns": [h["return"] for h in learner.history],
        "greedy": learner.greedy,
    }
    vulnerability = probe.get("vulnerability") or learner.mean_vulnerability()
    path = ctl.save(lc.controller or ldir / "controller.pt", learner.net, vulnerability, meta)
    plot_returns(learner.history, ldir / "returns.png")
    curve = f", greedy held-out curve: {ldir / 'greedy.png'}" if learner.greedy else ""
    echo(f"[learn] frozen controller: {path} (returns: {ldir / 'returns.png'}{curve})")
    return path


def _model_name(cc: ProxyMixSetting) -> str:
    m = cc.model
    return json.dumps(m.config) if m.config else m.name_or_path


def plot_returns(history: list[dict], path: Path) -> None:
    """Episode returns of a controller-learning run, with a running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = np.array([h["return"] for h in history], np.float64)
    if not len(r):
        return
    run = np.cumsum(r) / np.arange(1, len(r) + 1)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(np.arange(1, len(r) + 1), r, ".", label="episode return")
    ax.plot(np.arange(1, len(r) + 1), run, "-", label="running mean")
    ax.set_xlabel("episode")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
