"""From merge weights α to a training mixture: the ratio rule, its inverse, the run config.

The ratios are r ∝ α ⊙ c (:func:`ratio_scale`): ``ratio_rule: token_weighted`` weighs each α_k
by the tokens expert k trained on, and ``ratio_units: tokens`` turns token shares into
example shares (mixtune's weights) with each dataset's mean supervised tokens per example.
"""

from __future__ import annotations

import numpy as np

from mixtune import config as config_mod
from mixtune.config import RunConfig
from mixtune.planners.mergemix.config import PlanConfig


def ratio_scale(pc: PlanConfig, infos, summaries) -> np.ndarray:
    """c with ratios r ∝ α ⊙ c (so the inverse map is α ∝ r / c)."""
    c = np.ones(len(infos))
    if pc.ratio_rule == "token_weighted":
        c = c * np.array([max(s["tokens"], 1) for s in summaries], np.float64)
    if pc.ratio_units == "tokens":
        c = c / np.array([i.tokens / max(i.size, 1) for i in infos], np.float64)
    return c


def to_ratios(alpha, c) -> np.ndarray:
    """Data ratios (on the simplex) of merge weights ``alpha``."""
    r = np.asarray(alpha, np.float64) * c
    return r / r.sum()


def from_ratios(w, c) -> np.ndarray:
    """The merge weights whose ratios are ``w`` (the inverse of :func:`to_ratios`)."""
    a = np.asarray(w, np.float64) / c
    return a / a.sum()


def mixture_config(run: RunConfig, weights: dict, **top) -> dict:
    """The raw config of ``run`` training on ``weights`` (a ``fixed`` mixer), ``top`` keys set."""
    raw = config_mod.to_dict(run)
    raw["mixer"] = {"name": "fixed", "weights": {k: round(float(v), 6) for k, v in weights.items()}}
    raw.update(top)
    return raw
