"""ProxyMix state, policy output and reward: the scale-free pieces shared by every policy.

All inputs are validation losses divided by a per-task reference, so the same numbers mean the
same thing on a 1M-parameter proxy and on a large target (note §2.2, P1-P6, [PROPOSAL]):

    ratio_i  = L_i / L_i^ref     (ref: loss right after task i was learned, for a buffer; at
                                  the start of the stage, for the current task; at the start of
                                  the sequence, for the safety domain)
    x: log ratio_i, rank of ratio_i among the accessible slots / |A|,
       delta_i = log ratio_i(u) - log ratio_i(u-1), trend_i = beta trend_i + (1 - beta) delta_i,
       peak_i = log max_{v <= u} ratio_i(v)         (worst increase since it was learned),
       is_current, is_safety, age_i / S, stage progress, stage index / S       -> FEATURES
    globals  = log safety ratio and its delta (the safety domain need not be a slot)

The dynamics are taken in log-ratio space (a deviation from the note's plain ratios): a
well-learned skill has a tiny reference loss, and on the built-in base the safety loss went
from 0.07 to 12 (ratio 170) in one stage while the proxy's ratios stayed near 1-3; logs keep
such values within reach of what the controller saw on the proxy. Rewards stay in ratio units.

Policy output: a masked softmax over the slots with a floor p_min on the current task,
pi = p_min e_c + (1 - p_min) softmax(z / T) over accessible slots; others get exactly 0.
Reward of a decision: current-task gain - lambda_f (sum of buffer loss increases) - lambda_s
(safety loss increase), all in ratio units.
"""

from __future__ import annotations

import math

import numpy as np
import torch

FEATURES = (
    "log_ratio",
    "rank",
    "delta",
    "trend",
    "peak",
    "is_current",
    "is_safety",
    "age",
    "progress",
    "stage",
)
GLOBALS = ("safety_log_ratio", "safety_delta")
FEATURE_VERSION = 2


class Tracker:
    """Per-slot reference, last ratio, EMA trend and peak ratio; carried across stages."""

    def __init__(self, beta: float = 0.9, carry: dict | None = None):
        self.beta = beta
        self.slots: dict[str, dict] = {k: dict(v) for k, v in (carry or {}).items()}

    def observe(self, name: str, loss: float) -> tuple[float, float, float, float]:
        """-> (ratio, log-ratio delta, its EMA trend, log peak ratio) after seeing ``loss``."""
        st = self.slots.setdefault(
            name, {"ref": max(float(loss), 1e-8), "last": None, "trend": 0.0, "peak": 1.0}
        )
        ratio = max(float(loss), 1e-8) / st["ref"]
        delta = 0.0 if st["last"] is None else math.log(ratio / st["last"])
        st["trend"] = self.beta * st["trend"] + (1 - self.beta) * delta
        st["peak"] = max(st["peak"], ratio)
        st["last"] = ratio
        return ratio, delta, st["trend"], math.log(st["peak"])

    def rebase(self, name: str, loss: float) -> None:
        """Make ``loss`` the new reference of ``name`` (a task just learned becomes a buffer)."""
        self.slots[name] = {"ref": max(float(loss), 1e-8), "last": 1.0, "trend": 0.0, "peak": 1.0}

    def state(self) -> dict:
        return {k: dict(v) for k, v in self.slots.items()}


def slot_features(
    obs: list[tuple[float, float, float, float]],
    kinds: list[str],
    ages: list[float],
    progress: float,
    stage: float,
) -> np.ndarray:
    """(n, len(FEATURES)) for n slots; ``kinds`` are current | buffer | safety."""
    n = len(obs)
    x = np.zeros((n, len(FEATURES)), np.float32)
    ratios = np.array([o[0] for o in obs], np.float64)
    x[:, 0] = np.log(ratios)
    x[:, 1] = _ranks(ratios) / n
    x[:, 2:5] = np.array([o[1:] for o in obs], np.float64).reshape(n, 3)
    x[:, 5] = [k == "current" for k in kinds]
    x[:, 6] = [k == "safety" for k in kinds]
    x[:, 7] = ages
    x[:, 8] = progress
    x[:, 9] = stage
    return x


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get their average rank (as scipy's ``rankdata``)."""
    r = np.empty(len(v))
    r[np.argsort(v, kind="stable")] = np.arange(1, len(v) + 1)
    for val in np.unique(v):
        tie = v == val
        r[tie] = r[tie].mean()
    return r


def global_features(safety: tuple[float, float, float, float] | None) -> np.ndarray:
    if safety is None:
        return np.zeros(len(GLOBALS), np.float32)
    return np.array([math.log(safety[0]), safety[1]], np.float32)


def masked_policy(
    logits: torch.Tensor, mask: torch.Tensor, current: int, p_min: float, temperature: float = 1.0
) -> torch.Tensor:
    """pi = p_min e_c + (1 - p_min) softmax(z / T) over ``mask``; masked slots get exactly 0."""
    if not bool(mask[current]):
        raise ValueError("the current task's slot must be accessible")
    z = (logits / temperature).masked_fill(~mask, float("-inf"))
    p = torch.softmax(z, dim=-1)
    if int(mask.sum()) > 1 and p_min > 0:
        floor = torch.zeros_like(p)
        floor[current] = 1.0
        p = p_min * floor + (1.0 - p_min) * p
    return p


def reward(prev: dict, now: dict, lambda_forget: float, lambda_safety: float) -> float:
    """P6: gain on the current task - weighted buffer and safety loss increases (ratio units).

    ``prev``/``now`` are observations ``{"ratios": {slot: ratio}, "current": slot,
    "buffers": [slot, ...], "safety": ratio | None}`` of the same stage.
    """
    c = now["current"]
    gain = prev["ratios"][c] - now["ratios"][c]
    forget = sum(
        max(0.0, now["ratios"][b] - prev["ratios"][b])
        for b in now["buffers"]
        if b in prev["ratios"]
    )
    unsafe = 0.0
    if now.get("safety") is not None and prev.get("safety") is not None:
        unsafe = max(0.0, now["safety"] - prev["safety"])
    return float(gain - lambda_forget * forget - lambda_safety * unsafe)
