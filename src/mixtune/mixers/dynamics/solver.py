"""DynaMiCS's weight problem: a penalised linear program over the simplex, as pure functions.

Given one update's slope matrix S (rows = evaluation domains, columns = datasets), the anchors
L_i now, the references L_i^ref and the horizon H, the paper (Gualdoni et al. 2026, eq. 3.4)
solves, for every (λ, ε) of a grid (λ: 15 log-spaced values in [1, 5000]; ε ∈ {0, .05, .1}),

    w*(λ, ε) = argmin_{w ∈ Δ}  Σ_{i∈T} S_i·w  +  λ Σ_{i∈C} max(0, L_i + H·S_i·w − L_i^ref + ε)²

and keeps the candidate whose predicted constraints L̂_i(w) = L_i + H·S_i·w are all at or under
their references with the lowest target term or, if none is, the one with the smallest maximum
predicted violation. Values are "loss-like": an accuracy enters as −accuracy.

This module holds the problem (:class:`Problem`, :func:`objective`, :func:`max_violation`), the
solve for one (λ, ε) (:func:`solve`: the best of the minimisers and every vertex) and the grid
with the selection rule (:func:`choose`). How one (λ, ε) is minimised, exactly despite the bad
scaling, is :mod:`~mixtune.mixers.dynamics.minimisers`. Everything is deterministic: the same
inputs give bit-identical weights, so every rank of a distributed run computes the same mixture.

``fallback="minimax"`` (not in the paper) adds one candidate when nothing on the grid is
feasible: the exact minimiser of the maximum predicted violation (a linear program).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog

from mixtune.mixers.dynamics.minimisers import active_set, clean, interior_point, slsqp

EPSILONS = (0.0, 0.05, 0.1)
FEAS_TOL = 1e-9  # a predicted L̂ may exceed its reference by this much and count as feasible


def lambda_grid(n: int = 15, lo: float = 1.0, hi: float = 5000.0) -> np.ndarray:
    """``n`` log-spaced penalty weights in ``[lo, hi]`` (the paper: 15 in [1, 5000])."""
    return np.logspace(np.log10(lo), np.log10(hi), n)


@dataclass(frozen=True)
class Problem:
    """``c``: (K,) summed target slopes; ``A``: (C, K) = H·S_C; ``b``: (C,) = L_C − L_C^ref.
    The predicted violation of constraint i under mixture w is A_i·w + b_i."""

    c: np.ndarray
    A: np.ndarray
    b: np.ndarray

    @staticmethod
    def build(slopes, anchors, refs, targets, constraints, horizon: float) -> Problem:
        S = np.asarray(slopes, np.float64)  # (M, K)
        t, ci = list(targets), list(constraints)
        c = S[t].sum(0) if t else np.zeros(S.shape[1])
        A = (horizon * S[ci]).reshape(len(ci), S.shape[1])
        b = np.asarray(anchors, np.float64)[ci] - np.asarray(refs, np.float64)[ci]
        return Problem(c, A, b.reshape(len(ci)))

    @property
    def K(self) -> int:
        return self.c.size


def objective(p: Problem, w, lam: float, eps: float) -> float:
    """Eq. 3.4 at ``w`` (terms constant in w dropped, as in the paper)."""
    h = np.maximum(0.0, p.A @ w + p.b + eps)
    return float(p.c @ w + lam * (h @ h))


def max_violation(p: Problem, w) -> float:
    """Largest predicted excess over a reference (0 when every constraint holds); inf at a
    non-finite point, which ``max(0.0, nan)`` would otherwise report as 0, i.e. feasible."""
    v = p.A @ w + p.b
    if not (np.isfinite(w).all() and np.isfinite(v).all()):
        return np.inf
    return float(max(0.0, v.max(initial=0.0)))


def solve(p: Problem, lam: float, eps: float, method: str = "exact") -> np.ndarray:
    """The minimiser of eq. 3.4 on the simplex for one (λ, ε)."""
    K = p.K
    if method == "exact":
        cands = [active_set(p, lam, eps), interior_point(p, lam, eps)]
    elif method == "slsqp":
        cands = [slsqp(p, lam, eps)]
    else:
        raise ValueError(f"unknown solver {method!r}; use 'exact' or 'slsqp'")
    # A non-finite candidate is dropped and a NaN objective ranks last: np.argmin returns the
    # index of a NaN, which would otherwise win.
    cands = [w for w in cands if np.isfinite(w).all()]
    cands += list(np.eye(K))  # never worse than a single-dataset mixture
    vals = np.array([objective(p, w, lam, eps) for w in cands])
    return cands[int(np.argmin(np.where(np.isnan(vals), np.inf, vals)))]  # first minimum


def minimax(p: Problem) -> np.ndarray:
    """The mixture with the smallest maximum predicted violation (LP: min s, A w + b <= s)."""
    K, C = p.K, p.b.size
    res = linprog(
        np.r_[np.zeros(K), 1.0],
        A_ub=np.c_[p.A, -np.ones(C)],
        b_ub=-p.b,
        A_eq=np.r_[np.ones(K), 0.0][None],
        b_eq=[1.0],
        bounds=[(0, None)] * K + [(None, None)],
        method="highs",
    )
    return clean(res.x[:K]) if res.success else np.full(K, 1.0 / K)


# ---------------------------------------------------------------------------------------------
# The grid and the selection rule


@dataclass(frozen=True)
class Choice:
    weights: np.ndarray
    lam: float | None  # None: the minimax fallback
    eps: float | None
    feasible: bool  # every predicted constraint at or under its reference
    target: float  # Σ_{i∈T} S_i·w: predicted per-step change of the summed target loss
    max_violation: float  # largest predicted excess over a reference
    n_feasible: int  # feasible candidates on the grid


def choose(
    p: Problem, lambdas=None, epsilons=EPSILONS, method: str = "exact", fallback: str = "grid"
) -> Choice:
    """Solve eq. 3.4 on the (λ, ε) grid and apply the paper's selection rule."""
    lambdas = lambda_grid() if lambdas is None else lambdas
    cands = []

    def add(w, lam, eps):  # a non-finite mixture is never a candidate (a last guard)
        if np.isfinite(w).all():
            cands.append((w, lam, eps, float(p.c @ w), max_violation(p, w)))

    for eps in epsilons:
        for lam in lambdas:
            add(solve(p, float(lam), float(eps), method), float(lam), float(eps))
    feasible = [c for c in cands if c[4] <= FEAS_TOL]
    if feasible:  # lowest target term; ties go to the first in grid order
        w, lam, eps, target, viol = min(feasible, key=lambda c: c[3])
        return Choice(w, lam, eps, True, target, viol, len(feasible))
    if fallback == "minimax" and p.b.size:
        add(minimax(p), None, None)
    w, lam, eps, target, viol = min(cands, key=lambda c: (c[4], c[3]))
    return Choice(w, lam, eps, viol <= FEAS_TOL, target, viol, 0)
