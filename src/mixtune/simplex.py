"""Mixture weights: one validated point on the probability simplex, in train-dataset order.

Every mixture the loop applies passes through :func:`validate`, and user-given ratios through
:func:`normalize`, so the checks and their error messages live in one place.
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


def _show(arr: np.ndarray, names: Sequence[str] | None) -> str:
    if names is None:
        return str([float(x) for x in arr])
    return "{" + ", ".join(f"{n}: {float(x):.4g}" for n, x in zip(names, arr)) + "}"
