import itertools

import numpy as np
import pytest

from mixtune import simplex
from mixtune.errors import MixtuneError


def brute_project(v, grid=200):
    """Nearest simplex point by brute force over a fine grid (K = 3)."""
    best, best_d = None, np.inf
    for i, j in itertools.product(range(grid + 1), repeat=2):
        if i + j > grid:
            continue
        w = np.array([i, j, grid - i - j]) / grid
        d = np.sum((w - v) ** 2)
        if d < best_d:
            best, best_d = w, d
    return best


@pytest.mark.parametrize("seed", range(5))
def test_project_matches_brute_force(seed):
    v = np.random.default_rng(seed).normal(size=3)
    np.testing.assert_allclose(simplex.project(v), brute_project(v), atol=1e-2)


def test_project_keeps_points_on_simplex():
    w = np.array([0.2, 0.3, 0.5])
    np.testing.assert_allclose(simplex.project(w), w)


def test_validate_accepts_mapping_and_orders_by_name():
    w = simplex.validate({"b": 0.25, "a": 0.75}, ["a", "b"])
    np.testing.assert_allclose(w, [0.75, 0.25])


@pytest.mark.parametrize(
    "bad,msg",
    [
        ([0.5, float("nan")], "finite"),
        ([1.5, -0.5], "non-negative"),
        ([0.5, 0.2], "sum to 1"),
        ({"zz": 1.0}, "unknown dataset"),
        ([1.0], "1 weights for 2 datasets"),
    ],
)
def test_validate_rejects(bad, msg):
    with pytest.raises(MixtuneError, match=msg):
        simplex.validate(bad, ["a", "b"])


def test_normalize_ratios():
    np.testing.assert_allclose(simplex.normalize({"a": 2, "b": 1}, ["a", "b"]), [2 / 3, 1 / 3])


def test_clip_to_bounds_respects_floor_and_cap():
    w = simplex.clip_to_bounds([0.9, 0.1, 0.0], lower=[0, 0, 0.2], upper=[0.6, 1, 1])
    assert w[0] <= 0.6 + 1e-9 and w[2] >= 0.2 - 1e-9
    assert abs(w.sum() - 1) < 1e-9
    with pytest.raises(MixtuneError, match="infeasible"):
        simplex.clip_to_bounds([0.5, 0.5], lower=[0.7, 0.7])
