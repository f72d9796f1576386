"""Surrogates over the simplex (α -> one evaluation metric), fit quality, and simplex sampling.

MergeMix (arXiv 2601.17858, E3) fits one gradient-boosted tree ensemble (LightGBM) per
capability on the N evaluated merges. Options here:

- ``gbt`` (default, faithful): a small least-squares gradient-boosting ensemble written in
  numpy with LightGBM's growth rule (leaf-wise: always split the leaf with the largest gain,
  up to ``num_leaves``), ``min_data_in_leaf`` and shrinkage; the paper note's proposed settings
  (200 trees, 7 leaves, 3 points per leaf, learning rate 0.05) are the defaults. No extra
  dependency.
- ``lightgbm``: the real LightGBM with the same settings, when the package is installed.
- ``gp``: a Gaussian process (RBF kernel, constant mean, length scale and noise picked by
  marginal likelihood on a small grid). Smooth, so it interpolates between tiny-N points.
- ``quadratic``: Scheffé's quadratic mixture model y = Σ b_k α_k + Σ_{j<k} b_jk α_j α_k by ridge
  least squares (numpy only). Cheapest; exact for quadratic surfaces.

Tree models are piecewise constant: the search (planners/mergemix.py) therefore samples the
simplex densely instead of following a gradient.
"""

from __future__ import annotations

import numpy as np

from mixtune.errors import ConfigError

SURROGATES = ("gbt", "lightgbm", "gp", "quadratic")


# ---------------------------------------------------------------------------------------------
# Simplex points


def dirichlet(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points drawn uniformly on the simplex Δ^{k-1} (Dirichlet(1))."""
    return rng.dirichlet(np.ones(k), size=n) if n > 0 else np.zeros((0, k))


def seed_points(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """The k vertices, the centroid, then Dirichlet(1) samples up to ``n`` points in all."""
    base = np.vstack([np.eye(k), np.full((1, k), 1.0 / k)])[:n]
    return np.vstack([base, dirichlet(k, n - len(base), rng)])


def lattice(k: int, resolution: int) -> np.ndarray:
    """All points of the simplex with coordinates in multiples of 1/resolution."""
    out: list[list[int]] = []

    def rec(prefix: list[int], left: int, slots: int) -> None:
        if slots == 1:
            out.append(prefix + [left])
            return
        for i in range(left, -1, -1):
            rec(prefix + [i], left - i, slots - 1)

    rec([], resolution, k)
    return np.asarray(out, np.float64) / resolution


# ---------------------------------------------------------------------------------------------
# Models: fit(X, y) -> self, predict(X) -> (n,)


class GBT:
    """Least-squares gradient boosting with leaf-wise regression trees (LightGBM-style)."""

    def __init__(
        self,
        n_estimators: int = 200,
        num_leaves: int = 7,
        min_data_in_leaf: int = 3,
        learning_rate: float = 0.05,
    ):
        self.n, self.leaves, self.min_leaf, self.lr = (
            n_estimators,
            num_leaves,
            min_data_in_leaf,
            learning_rate,
        )

    def fit(self, X: np.ndarray, y: np.ndarray) -> GBT:
        X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
        self.bias = float(y.mean())
        pred = np.full(len(y), self.bias)
        self.trees = []
        for _ in range(self.n):
            tree = self._tree(X, y - pred)
            if tree is None:  # no split possible: the residual cannot be reduced any more
                break
            self.trees.append(tree)
            pred += self.lr * _apply(tree, X)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, np.float64)
        out = np.full(len(X), self.bias)
        for tree in self.trees:
            out += self.lr * _apply(tree, X)
        return out

    def _tree(self, X, r):
        # A tree is a list of (feature, threshold, left, right) nodes and leaf values;
        # leaves are grown best-first on squared-error gain.
        leaves = [np.arange(len(r))]
        splits: list = []  # per leaf: best (gain, feature, threshold) or None
        nodes: list = [None]  # node -> ("leaf", value) or (feature, threshold, left, right)
        leaf_node = [0]
        splits.append(self._best_split(X, r, leaves[0]))
        while len(leaves) < self.leaves:
            cand = [(s[0], i) for i, s in enumerate(splits) if s is not None]
            if not cand:
                break
            _, i = max(cand)
            _, f, thr = splits[i]
            idx = leaves[i]
            left, right = idx[X[idx, f] <= thr], idx[X[idx, f] > thr]
            node = leaf_node[i]
            nodes[node] = (f, thr, len(nodes), len(nodes) + 1)
            nodes += [None, None]
            leaves[i], leaf_node[i], splits[i] = left, nodes[node][2], self._best_split(X, r, left)
            leaves.append(right)
            leaf_node.append(nodes[node][3])
            splits.append(self._best_split(X, r, right))
        if len(leaves) == 1:
            return None
        for idx, node in zip(leaves, leaf_node):
            nodes[node] = ("leaf", float(r[idx].mean()))
        return nodes

    def _best_split(self, X, r, idx):
        n = len(idx)
        if n < 2 * self.min_leaf:
            return None
        total = r[idx].sum()
        order = idx[np.argsort(X[idx], axis=0, kind="stable")]  # (n, F) sorted per feature
        xs = np.take_along_axis(X[idx], np.argsort(X[idx], axis=0, kind="stable"), 0)
        cs = np.cumsum(r[order], axis=0)  # (n, F) left sums
        nl = np.arange(1, n)[:, None]
        gain = cs[:-1] ** 2 / nl + (total - cs[:-1]) ** 2 / (n - nl) - total**2 / n
        ok = (xs[:-1] < xs[1:]) & (nl >= self.min_leaf) & (n - nl >= self.min_leaf)
        gain = np.where(ok, gain, -np.inf)
        j, f = np.unravel_index(np.argmax(gain), gain.shape)
        if not gain[j, f] > 1e-12:
            return None
        return float(gain[j, f]), int(f), 0.5 * (xs[j, f] + xs[j + 1, f])


def _apply(tree, X: np.ndarray, node: int = 0):
    """Leaf values of ``tree`` for every row of X (whole-array selects: fast for small trees)."""
    spec = tree[node]
    if spec[0] == "leaf":
        return spec[1]
    f, thr, left, right = spec
    return np.where(X[:, f] <= thr, _apply(tree, X, left), _apply(tree, X, right))


class LightGBM:
    """The real LightGBM with the same defaults (optional dependency)."""

    def __init__(self, **kw):
        try:
            import lightgbm
        except ImportError:
            raise ConfigError(
                "search.surrogate: 'lightgbm' needs the lightgbm package "
                "(pip install lightgbm), or use gbt, gp or quadratic"
            ) from None
        self.model = lightgbm.LGBMRegressor(
            n_estimators=200,
            num_leaves=7,
            min_child_samples=3,
            learning_rate=0.05,
            verbose=-1,
            **kw,
        )

    def fit(self, X, y):
        self.model.fit(np.asarray(X), np.asarray(y))
        return self

    def predict(self, X):
        return self.model.predict(np.asarray(X))


class Quadratic:
    """Scheffé quadratic mixture model fit by ridge least squares."""

    def __init__(self, ridge: float = 1e-6):
        self.ridge = ridge

    @staticmethod
    def features(X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, np.float64)
        j, k = np.triu_indices(X.shape[1], 1)
        return np.hstack([X, X[:, j] * X[:, k]])

    def fit(self, X, y):
        F = self.features(X)
        A = F.T @ F + self.ridge * np.eye(F.shape[1])
        self.coef = np.linalg.solve(A, F.T @ np.asarray(y, np.float64))
        return self

    def predict(self, X):
        return self.features(X) @ self.coef


class GP:
    """Gaussian process regression, RBF kernel, hyperparameters by marginal likelihood."""

    LENGTHS = (0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 2.0)
    NOISES = (1e-4, 1e-3, 1e-2, 1e-1)

    def fit(self, X, y):
        X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
        self.X, self.mean = X, float(y.mean())
        self.scale = float(y.std()) or 1.0
        z = (y - self.mean) / self.scale
        d2 = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
        best = None
        for ell in self.LENGTHS:
            for noise in self.NOISES:
                K = np.exp(-0.5 * d2 / ell**2) + noise * np.eye(len(X))
                try:
                    L = np.linalg.cholesky(K)
                except np.linalg.LinAlgError:
                    continue
                a = np.linalg.solve(L.T, np.linalg.solve(L, z))
                nll = 0.5 * z @ a + np.log(np.diag(L)).sum()
                if best is None or nll < best[0]:
                    best = (nll, ell, a)
        _, self.ell, self.a = best
        return self

    def predict(self, X):
        X = np.asarray(X, np.float64)
        out = np.empty(len(X))
        for lo in range(0, len(X), 20000):  # chunks keep the kernel matrix small
            d2 = ((X[lo : lo + 20000, None, :] - self.X[None, :, :]) ** 2).sum(-1)
            out[lo : lo + 20000] = np.exp(-0.5 * d2 / self.ell**2) @ self.a
        return self.mean + self.scale * out


def make(name: str):
    """A fresh, unfitted surrogate by name."""
    if name == "gbt":
        return GBT()
    if name == "lightgbm":
        return LightGBM()
    if name == "gp":
        return GP()
    if name == "quadratic":
        return Quadratic()
    raise ConfigError(f"search.surrogate: got {name!r}; allowed values are {list(SURROGATES)}")


def leave_one_out(name: str, X: np.ndarray, y: np.ndarray) -> dict:
    """Leave-one-out predictions, R² and RMSE of surrogate ``name`` on (X, y)."""
    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    pred = np.empty(len(y))
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        pred[i] = make(name).fit(X[keep], y[keep]).predict(X[i : i + 1])[0]
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {
        "pred": pred.tolist(),
        "rmse": float(np.sqrt(ss_res / len(y))),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
    }
