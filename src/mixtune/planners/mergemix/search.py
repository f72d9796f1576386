"""MergeMix's search over merge weights: seeds, surrogates, dense simplex sampling, refits.

Steps (arXiv 2601.17858 §E3-E4 and the paper note's algorithm 1.4, lines 2-6):

1. Evaluate N seed points α (the K vertices, the centroid, Dirichlet(1) samples).
2. Fit one surrogate per needed (domain, metric) on the table S of evaluated points.
3. Score a dense candidate set (Dirichlet(1) samples plus every evaluated point) with the
   objective J(α) = Σ_m w_m ŷ_m(α) (lower is better for losses, higher for accuracies), keep
   the candidates whose predicted constraint metrics respect their bounds, take the best.
4. Optionally (``refit_rounds``) evaluate the top-k candidates as real merges, add them to S,
   refit, and search again.

Deliberate choices (PROPOSAL items of the note, each an option of the plan):

1. Ties: a tree surrogate is flat on whole regions, so the best prediction is usually shared by
   many candidates; α* is the mean of the tied candidates (the region is convex, so the mean
   lies in it and has the same prediction) rather than an arbitrary one of them.
2. No feasible candidate: α* minimises the summed relative constraint violation, and the result
   says so (``feasible: false``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mixtune.planners.mergemix import surrogate as sg

log = logging.getLogger(__name__)

Scores = dict[str, dict[str, float]]  # {domain: {"loss": ..., "accuracy": ...}}


@dataclass(frozen=True)
class Bound:
    domain: str
    metric: str  # loss | accuracy
    limit: float
    upper: bool  # True: value <= limit (losses); False: value >= limit (accuracies)

    def violation(self, y: np.ndarray) -> np.ndarray:
        gap = (y - self.limit) if self.upper else (self.limit - y)
        return np.maximum(gap, 0.0) / max(abs(self.limit), 1e-8)


@dataclass(frozen=True)
class Objective:
    weights: dict[str, float]  # domain -> weight (normalised to sum 1)
    metric: str = "loss"

    def value(self, values: dict[tuple[str, str], np.ndarray]) -> np.ndarray:
        return sum(w * values[(d, self.metric)] for d, w in self.weights.items())

    def utility(self, values) -> np.ndarray:
        v = self.value(values)
        return -v if self.metric == "loss" else v


@dataclass
class SearchResult:
    alpha: np.ndarray
    predicted: dict[str, dict[str, float]]
    predicted_objective: float
    feasible: bool
    table: list[dict]
    fits: dict[str, dict[str, dict]] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)


def quantities(objective: Objective, bounds: list[Bound]) -> list[tuple[str, str]]:
    need = [(d, objective.metric) for d in objective.weights]
    need += [(b.domain, b.metric) for b in bounds]
    return list(dict.fromkeys(need))


def fit_all(name: str, table: list[dict], need: list[tuple[str, str]]) -> dict:
    X = np.array([r["alpha"] for r in table])
    return {
        q: sg.make(name).fit(X, np.array([r["scores"][q[0]][q[1]] for r in table])) for q in need
    }


def run(
    evaluate: Callable[[np.ndarray, str], Scores],
    k: int,
    *,
    objective: Objective,
    bounds: list[Bound],
    surrogate: str = "gbt",
    n_seeds: int = 20,
    n_candidates: int = 100_000,
    refit_rounds: int = 0,
    top_k: int = 5,
    seed: int = 0,
    progress: bool = False,
    loo: bool = True,
) -> SearchResult:
    """Search α* on Δ^{k-1}; ``evaluate(alpha, source)`` returns measured per-domain scores."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    need = quantities(objective, bounds)
    table: list[dict] = []

    def measure(points: np.ndarray, source: str, desc: str) -> None:
        for a in tqdm(points, desc=desc, unit="merge", disable=not progress, dynamic_ncols=True):
            table.append(
                {
                    "alpha": [float(x) for x in a],
                    "source": source,
                    "scores": evaluate(np.asarray(a), source),
                }
            )

    measure(seed_points(k, n_seeds, rng), "seed", "merged seeds")
    rounds = []
    for rnd in range(refit_rounds + 1):
        models = fit_all(surrogate, table, need)
        cand = np.vstack(
            [dirichlet_candidates(k, n_candidates, rng), np.array([r["alpha"] for r in table])]
        )
        values = {q: m.predict(cand) for q, m in models.items()}
        util = objective.utility(values)
        viol = sum((b.violation(values[(b.domain, b.metric)]) for b in bounds), np.zeros(len(cand)))
        feasible = viol <= 0
        rounds.append(
            {"round": rnd, "points": len(table), "feasible_share": float(feasible.mean())}
        )
        if rnd < refit_rounds:
            measure(
                _top_k(cand, util, feasible, viol, table, top_k),
                f"refit{rnd + 1}",
                f"refit round {rnd + 1}",
            )
            continue
        alpha, ok = _best(cand, util, feasible, viol)
        pred = {q: float(m.predict(alpha[None])[0]) for q, m in models.items()}
        predicted: dict[str, dict[str, float]] = {}
        for (d, met), v in pred.items():
            predicted.setdefault(d, {})[met] = v
        pobj = float(objective.value({q: np.array([v]) for q, v in pred.items()})[0])
        fits: dict[str, dict[str, dict]] = {}
        if loo and len(table) >= 3:
            X = np.array([r["alpha"] for r in table])
            for d, met in need:
                y = np.array([r["scores"][d][met] for r in table])
                fits.setdefault(d, {})[met] = sg.leave_one_out(surrogate, X, y)
        if not ok:
            log.warning(
                "mergemix: no candidate satisfies every constraint on the surrogate; "
                "alpha* minimises the total violation"
            )
        return SearchResult(alpha, predicted, pobj, ok, table, fits, rounds)
    raise AssertionError("unreachable")


def seed_points(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return sg.seed_points(k, n, rng)


def dirichlet_candidates(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.vstack([sg.dirichlet(k, n, rng), np.eye(k), np.full((1, k), 1.0 / k)])


def _best(cand, util, feasible, viol) -> tuple[np.ndarray, bool]:
    if feasible.any():
        u = np.where(feasible, util, -np.inf)
        top = u.max()
        tied = u >= top - 1e-9 * (abs(top) + 1)
        return cand[tied].mean(0), True
    low = viol.min()
    tied = viol <= low + 1e-12
    return cand[tied].mean(0), False


def _top_k(cand, util, feasible, viol, table, k) -> np.ndarray:
    """The k best distinct candidates (feasible first) not yet evaluated."""
    key = np.where(feasible, util, -np.inf)
    order = np.lexsort((-key, viol)) if not feasible.any() else np.argsort(-key, kind="stable")
    seen = np.array([r["alpha"] for r in table])
    out: list[np.ndarray] = []
    for i in order:
        a = cand[i]
        pts = np.vstack([seen, *out]) if out else seen
        if np.abs(pts - a).sum(1).min() > 1e-3:
            out.append(a)
        if len(out) == k:
            break
    return np.array(out).reshape(-1, cand.shape[1])
