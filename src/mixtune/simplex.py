"""Mixture weights: one validated point on the probability simplex, in train-dataset order.

Every mixer's output passes through :func:`validate` (or :func:`project` first, for mixers that
produce unnormalised scores), so floors, caps and errors live in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mixtune.errors import MixtuneError

Weights = np.ndarray  # shape (K,), float64, non-negative, sums to 1

SUM_TOL = 1e-6


def validate(w, names: Sequence[str] | None = None, *, what: str = "weights") -> Weights:
    """Check that ``w`` is a point of the simplex and return it as float64 (renormalised exactly).

    ``w`` may be a sequence in dataset order or, when ``names`` is given, a mapping name -> weight
    (missing names get 0). Raises :class:`MixtuneError` naming the problem.
    """
    if isinstance(w, Mapping):
        if names is None:
            raise MixtuneError(f"{what}: a mapping of weights needs the dataset names")
        unknown = [k for k in w if k not in names]
        if unknown:
            raise MixtuneError(
                f"{what}: unknown dataset name(s) {unknown}; known datasets are {list(names)}"
            )
        w = [w.get(n, 0.0) for n in names]
    try:
        arr = np.asarray(w, dtype=np.float64)
    except (TypeError, ValueError):
        raise MixtuneError(f"{what}: expected numbers, got {w!r}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise MixtuneError(f"{what}: expected a non-empty 1-D list, got shape {arr.shape}")
    if names is not None and arr.size != len(names):
        raise MixtuneError(
            f"{what}: got {arr.size} weights for {len(names)} datasets {list(names)}"
        )
    if not np.all(np.isfinite(arr)):
        raise MixtuneError(f"{what}: weights must be finite numbers, got {_show(arr, names)}")
    if np.any(arr < 0):
        raise MixtuneError(f"{what}: weights must be non-negative, got {_show(arr, names)}")
    total = arr.sum()
    if abs(total - 1.0) > SUM_TOL:
        raise MixtuneError(f"{what}: weights must sum to 1 (got {total:.6g}): {_show(arr, names)}")
    return arr / total


def normalize(w, names: Sequence[str] | None = None, *, what: str = "weights") -> Weights:
    """Turn non-negative ratios (e.g. ``{math: 2, chat: 1}``) into simplex weights."""
    if isinstance(w, Mapping):
        if names is None:
            raise MixtuneError(f"{what}: a mapping of weights needs the dataset names")
        unknown = [k for k in w if k not in names]
        if unknown:
            raise MixtuneError(
                f"{what}: unknown dataset name(s) {unknown}; known datasets are {list(names)}"
            )
        w = [w.get(n, 0.0) for n in names]
    arr = np.asarray(w, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise MixtuneError(
            f"{what}: ratios must be finite and non-negative, got {_show(arr, names)}"
        )
    if arr.sum() <= 0:
        raise MixtuneError(f"{what}: at least one weight must be positive")
    return validate(arr / arr.sum(), names, what=what)


def project(v) -> Weights:
    """Euclidean projection of ``v`` onto the simplex (sort-based, O(K log K))."""
    v = np.asarray(v, dtype=np.float64)
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.arange(1, v.size + 1)
    rho = np.nonzero(u - css / k > 0)[0][-1]
    theta = css[rho] / (rho + 1.0)
    return np.maximum(v - theta, 0.0)


def clip_to_bounds(w, lower=None, upper=None, iters: int = 100) -> Weights:
    """Move ``w`` to the nearest simplex point with ``lower <= w <= upper`` (elementwise).

    Alternates clipping and re-projecting the free coordinates; exact for feasible bounds.
    """
    w = np.asarray(w, dtype=np.float64)
    lo = np.zeros_like(w) if lower is None else np.broadcast_to(np.asarray(lower, float), w.shape)
    hi = np.ones_like(w) if upper is None else np.broadcast_to(np.asarray(upper, float), w.shape)
    if lo.sum() > 1 + SUM_TOL or hi.sum() < 1 - SUM_TOL or np.any(lo > hi):
        raise MixtuneError(f"weight bounds are infeasible: lower={lo.tolist()} upper={hi.tolist()}")
    # Bisection on the shift theta: sum(clip(w - theta, lo, hi)) is monotone in theta.
    a, b = float((w - hi).min()) - 1.0, float((w - lo).max()) + 1.0
    for _ in range(iters):
        mid = 0.5 * (a + b)
        if np.clip(w - mid, lo, hi).sum() > 1.0:
            a = mid
        else:
            b = mid
    out = np.clip(w - 0.5 * (a + b), lo, hi)
    return out / out.sum()


def entropy(w) -> float:
    w = np.asarray(w, dtype=np.float64)
    nz = w[w > 0]
    return float(-(nz * np.log(nz)).sum())


def _show(arr: np.ndarray, names: Sequence[str] | None) -> str:
    if names is None:
        return str([float(x) for x in arr])
    return "{" + ", ".join(f"{n}: {float(x):.4g}" for n, x in zip(names, arr)) + "}"
