"""MergeMix's search over merge weights: seeds, surrogates, dense simplex sampling, refits.

Steps (arXiv 2601.17858 §E3-E4 and the paper note's algorithm 1.4, lines 2-6):

1. Evaluate N seed points α (the K vertices, the centroid, Dirichlet(1) samples).
2. Fit one surrogate per needed (domain, metric) on the table S of evaluated points.
3. Score a dense candidate set (Dirichlet(1) samples plus every evaluated point) with the
   objective J(α) = Σ_m w_m ŷ_m(α) (lower is better for losses, higher for accuracies), keep
   the candidates whose predicted constraint metrics respect their bounds, take the best.
4. Optionally (``refit_rounds``) evaluate the top-k candidates as real merges, add them to S,
   refit, and search again.

How α* is chosen (``select``):

- ``measured`` (default): the surrogate only *proposes*. Its candidates are restricted to a
  trust region, the points within ``trust_radius`` (Euclidean; auto: the median distance of a
  measured merge to its nearest measured neighbour) of a measured merge, so it never scores a
  corner it has no data near; its optimum there is merged and measured (so is every refit
  round's top-k: the surrogate is refit exactly where it proposed to go), and α* is the best
  *measured* merge within the bounds (the least-violating one when none is within them). α* is
  therefore always a merge whose objective was measured, never an extrapolation: on the
  built-in benchmark the gbt surrogate's optimum over the whole simplex was a corner predicted
  at 0.600 that measured 0.874 (9th of 10 mixtures trained for real).
- ``surrogate`` (the paper, faithful): α* is the surrogate's optimum over the whole simplex (or
  inside ``trust_radius`` when one is given), measured only for the report.

Objective normalisation (``Objective.spread``; the plan's ``objective.normalize: spread``, its
default): each domain's metric is centred and divided by its standard deviation over the seed
merges, so J is a weighted mean of z-scores and each domain's share of J's spread
(:func:`shares`) equals its weight; ``normalize: base`` (ratios to the base model) lets a domain
with a small base loss dominate (arithmetic was 83% of the benchmark's objective).

Deliberate choices (PROPOSAL items of the note, each an option of the plan):

1. Ties: a tree surrogate is flat on whole regions, so the best prediction is usually shared by
   many candidates; the surrogate's optimum is the mean of the tied candidates (the region is
   convex, so the mean lies in it and has the same prediction) rather than an arbitrary one.
2. No feasible candidate: the optimum minimises the summed relative constraint violation, and
   the result says so (``feasible: false``).
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
    """J = Σ_d w_d (y_d − c_d) over the domains' ``metric`` (centres c_d default to 0)."""

    weights: dict[str, float]  # domain -> weight (normalised to sum 1 before any rescaling)
    metric: str = "loss"
    center: dict[str, float] | None = None
    spread: bool = False
    """Pending spread normalisation: :func:`run` applies :func:`by_spread` to the seed merges."""

    def value(self, values: dict[tuple[str, str], np.ndarray]) -> np.ndarray:
        c = self.center or {}
        return sum(w * (values[(d, self.metric)] - c.get(d, 0.0)) for d, w in self.weights.items())

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
    objective: Objective | None = None  # the objective used (spread normalisation resolved)
    proposal: np.ndarray | None = None  # the surrogate's optimum (= alpha with select=surrogate)
    selected: str = "surrogate"  # "surrogate" or "measured merge #i (source)"
    trust_radius: float | None = None  # the radius of the last round (None: whole simplex)


def _column(table: list[dict], d: str, metric: str) -> np.ndarray:
    return np.array([r["scores"][d][metric] for r in table], np.float64)


def by_spread(objective: Objective, table: list[dict]) -> Objective:
    """``objective`` on z-scores: each domain centred on its mean over the merges in ``table``
    and divided by its standard deviation there. A domain that does not vary gets weight 0 (it
    cannot change any ranking)."""
    weights, center = {}, {}
    for d, w in objective.weights.items():
        y = _column(table, d, objective.metric)
        sd = float(y.std())
        weights[d] = w / sd if sd > 1e-12 else 0.0
        center[d] = float(y.mean())
        if sd <= 1e-12:
            log.warning("mergemix: %s does not vary over the seed merges; weight 0", d)
    return Objective(weights, objective.metric, center)


def shares(objective: Objective, table: list[dict]) -> dict[str, float]:
    """Each domain's share of the objective's spread over ``table``'s merges:
    |w_d|·sd_d / Σ_j |w_j|·sd_j (a domain with share 0.8 decides most of the ranking)."""
    part = {
        d: abs(w) * float(_column(table, d, objective.metric).std())
        for d, w in objective.weights.items()
    }
    total = sum(part.values())
    return {d: (v / total if total > 0 else 0.0) for d, v in part.items()}


def auto_radius(points: np.ndarray) -> float:
    """The median distance of a point to its nearest other point (the trust radius default)."""
    P = np.asarray(points, np.float64)
    dist = np.sqrt(((P[:, None, :] - P[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    return float(np.median(dist.min(1)))


def within(cand: np.ndarray, points: np.ndarray, radius: float) -> np.ndarray:
    """Mask of the candidates within ``radius`` (Euclidean) of at least one of ``points``."""
    near = np.full(len(cand), np.inf)
    for p in np.asarray(points, np.float64):  # a few dozen points: loop, keep memory O(n)
        near = np.minimum(near, np.sqrt(((cand - p) ** 2).sum(1)))
    return near <= radius + 1e-12


def best_measured(table: list[dict], objective: Objective, bounds: list[Bound]) -> tuple[int, bool]:
    """Index of the best merge of ``table`` on its measured scores within the bounds (or, when
    none is within them, the least violating one) and whether it is within them."""
    q = {(d, m): _column(table, d, m) for d, m in quantities(objective, bounds)}
    util = objective.utility(q)
    viol = sum((b.violation(q[(b.domain, b.metric)]) for b in bounds), np.zeros(len(table)))
    if (viol <= 0).any():
        return int(np.argmax(np.where(viol <= 0, util, -np.inf))), True
    return int(np.argmin(viol)), False


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
    select: str = "measured",
    trust_radius: float | None = None,
) -> SearchResult:
    """Search α* on Δ^{k-1}; ``evaluate(alpha, source)`` returns measured per-domain scores.

    ``select`` and ``trust_radius``: see the module docstring (``trust_radius`` None = auto
    with ``measured``, the whole simplex with ``surrogate``). An ``objective`` with ``spread``
    is normalised on the seed merges; the result holds the objective actually used.
    """
    if select not in ("measured", "surrogate"):
        raise ValueError(f"select: 'measured' or 'surrogate', got {select!r}")
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
    if objective.spread:
        objective = by_spread(objective, table)
    rounds = []
    for rnd in range(refit_rounds + 1):
        models = fit_all(surrogate, table, need)
        seen = np.array([r["alpha"] for r in table])
        cand = np.vstack([dirichlet_candidates(k, n_candidates, rng), seen])
        radius = trust_radius
        if radius is None and select == "measured":
            radius = auto_radius(seen)
        if radius is not None:  # the trust region: only candidates near measured merges
            cand = cand[within(cand, seen, radius)]
        values = {q: m.predict(cand) for q, m in models.items()}
        util = objective.utility(values)
        viol = sum((b.violation(values[(b.domain, b.metric)]) for b in bounds), np.zeros(len(cand)))
        feasible = viol <= 0
        rounds.append(
            {
                "round": rnd,
                "points": len(table),
                "feasible_share": float(feasible.mean()),
                "trust_radius": radius,
                "candidates": len(cand),
            }
        )
        if rnd < refit_rounds:
            measure(
                _top_k(cand, util, feasible, viol, table, top_k),
                f"refit{rnd + 1}",
                f"refit round {rnd + 1}",
            )
            continue
        alpha, ok = _best(cand, util, feasible, viol, seen, radius)
        proposal, selected = alpha, "surrogate"
        if select == "measured":
            if np.abs(seen - alpha).sum(1).min() > 1e-6:  # measure the proposal, once
                measure(alpha[None], "proposal", "surrogate's proposal")
            i, ok = best_measured(table, objective, bounds)
            alpha = np.asarray(table[i]["alpha"], np.float64)
            selected = f"measured merge #{i} ({table[i]['source']})"
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
                "mergemix: no %s satisfies every constraint; alpha* minimises the total violation",
                "measured merge" if select == "measured" else "candidate on the surrogate",
            )
        return SearchResult(
            alpha, predicted, pobj, ok, table, fits, rounds, objective, proposal, selected, radius
        )
    raise AssertionError("unreachable")


def seed_points(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return sg.seed_points(k, n, rng)


def dirichlet_candidates(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.vstack([sg.dirichlet(k, n, rng), np.eye(k), np.full((1, k), 1.0 / k)])


def _best(cand, util, feasible, viol, seen=None, radius=None) -> tuple[np.ndarray, bool]:
    """The mean of the tied best candidates; with a trust region (``seen``, ``radius``: a union
    of balls, not convex) the tied candidate nearest that mean when the mean falls outside."""
    if feasible.any():
        u = np.where(feasible, util, -np.inf)
        top = u.max()
        tied, ok = u >= top - 1e-9 * (abs(top) + 1), True
    else:
        tied, ok = viol <= viol.min() + 1e-12, False
    alpha = cand[tied].mean(0)
    if radius is not None and not within(alpha[None], seen, radius)[0]:
        pts = cand[tied]
        alpha = pts[((pts - alpha) ** 2).sum(1).argmin()]
    return alpha, ok


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
