"""Minimisers of DynaMiCS's penalised problem (eq. 3.4) for one (λ, ε), on the simplex.

The problem is convex (a linear term plus squared hinges of affine functions) but badly scaled
(target slopes ~1e-3 per step next to penalties up to 5000·(H·S)²). scipy's SLSQP stalls on a
few per cent of such instances ("positive directional derivative"), so the default solver,
``exact``, runs two exact methods and :func:`mixtune.mixers.dynamics.solver.solve` keeps the
better point (and never one worse than the best vertex):

- :func:`active_set`: a primal active-set method on the piecewise-quadratic objective (Newton
  steps on the current face and hinge pattern, exact piecewise-quadratic line search,
  multiplier checks);
- :func:`interior_point`: a Mehrotra interior-point method on the equivalent QP in (w, u),
  u ≥ A w + b + ε, u ≥ 0.

:func:`slsqp` (scipy, on the same smooth QP) is kept as the ``solver: slsqp`` option.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import minimize

if TYPE_CHECKING:
    from mixtune.mixers.dynamics.solver import Problem


def gradient(p: Problem, w, lam: float, eps: float) -> np.ndarray:
    """The gradient of eq. 3.4 at ``w`` (continuous: the hinges are squared)."""
    return p.c + 2.0 * lam * (p.A.T @ np.maximum(0.0, p.A @ w + p.b + eps))


# ---------------------------------------------------------------------------------------------
# Exact method 1: primal active set on the piecewise-quadratic objective


def active_set(p: Problem, lam: float, eps: float) -> np.ndarray:
    """Primal active set from the uniform mixture: Newton steps on the face of the simplex
    where the zero coordinates stay zero, an exact line search that stops at the face's edge,
    and release of the zero coordinate whose multiplier says the objective would go down."""
    K = p.K
    w, fixed, released = np.full(K, 1.0 / K), np.zeros(K, bool), -1
    for _ in range(50 * K + 50):
        free = np.flatnonzero(~fixed)
        g = gradient(p, w, lam, eps)
        gscale = max(np.abs(p.c).max(initial=0.0), np.abs(g).max()) + 1e-300
        d, newton = np.zeros(K), False
        if free.size > 1:
            d, newton = _face_direction(p, w, g, free, lam, eps)
            d[fixed] = 0.0
            if released >= 0 and d[released] <= 0:  # move mass onto the released coordinate
                j = free[np.argmax(np.where(w[free] > 0, g[free], -np.inf))]
                d, newton = np.zeros(K), False
                d[released], d[j] = 1.0, -1.0
            if not (np.abs(d).max() > 1e-12 and g @ d < 0) and np.ptp(g[free]) > 1e-10 * gscale:
                # Not stationary on the face although the model says so: a hinge sits at its
                # kink. A projected-gradient step (with the exact line search) gets past it.
                d, newton = np.zeros(K), False
                d[free] = -(g[free] - g[free].mean())
        was_released, released = released, -1
        if _descends(p, w, g, d, lam, eps):
            neg = np.flatnonzero(d < 0)
            ratios = -w[neg] / d[neg]
            tmax = min(ratios.min(), 1.0) if newton else ratios.min()
            t = line_min(p, w, d, lam, eps, tmax) if tmax > 0 else 0.0
            w_old, w = w, w + t * d
            hit = neg[ratios <= t]
            w[hit], fixed[hit] = 0.0, True
            w = np.maximum(w, 0.0)
            w /= w.sum()
            if was_released < 0 and not hit.size and w.tobytes() == w_old.tobytes():
                break  # w, face and release unchanged: every later iteration repeats this one
            continue
        # Optimal on this face; release the zero coordinate with the most negative multiplier.
        gap = np.where(fixed, g - g[free].mean(), np.inf)
        k = int(np.argmin(gap))
        if gap[k] >= -1e-10 * gscale:
            break
        fixed[k], released = False, k
    return w


def _face_direction(p: Problem, w, g, free, lam, eps) -> tuple[np.ndarray, bool]:
    """Newton step to the minimum of the quadratic model on the face (sum fixed, others 0), or
    a descent direction along which that model is linear."""
    K, n = p.K, free.size
    Z = np.zeros((K, n - 1))
    Z[free[:-1], np.arange(n - 1)] = 1.0
    Z[free[-1], :] = -1.0
    Z = np.linalg.qr(Z)[0]  # orthonormal basis of the face directions
    r = p.A @ w + p.b + eps
    on = r > 1e-12 * (np.abs(p.A).sum(1) + np.abs(p.b + eps))  # hinges in their quadratic part
    AZ = p.A[on] @ Z
    evals, evecs = np.linalg.eigh(2.0 * lam * AZ.T @ AZ)
    gy = Z.T @ g
    # Curvature under 1e-20 of the whole Hessian's trace is rounding, not curvature: with
    # duplicate or zero columns AZ is ~1e-16·|A| instead of 0, and dividing by its square gave
    # an astronomically long "Newton" step along noise.
    floor = 1e-20 * 2.0 * lam * np.square(p.A[on]).sum()
    big = evals > max(1e-12 * max(evals.max(initial=0.0), 1e-300), floor)
    null = evecs[:, ~big] @ (evecs[:, ~big].T @ gy)
    if np.abs(null).max(initial=0.0) > 1e-12 * (np.abs(gy).max() + 1e-300):
        return -Z @ null, False
    return -Z @ ((evecs[:, big] / evals[big]) @ (evecs[:, big].T @ gy)), True


def _descends(p: Problem, w, g, d, lam, eps) -> bool:
    """Whether a step along ``d`` is worth a line search: ``d`` finite, not negligible, with a
    finite distance to the simplex's boundary, and downhill both as ``g @ d`` and as
    ``line_min``'s slope at 0 round it. The two disagree when ``g @ d`` is rounding noise (a
    ~1e-15 direction, duplicate or zero columns); ``line_min`` must never see an uphill start."""
    if not (np.isfinite(d).all() and np.abs(d).max() > 1e-15 and g @ d < 0):
        return False
    neg = d < 0
    with np.errstate(over="ignore"):
        if not (neg.any() and np.isfinite(w[neg] / d[neg]).all()):
            return False
    return _slope_at(p, w, d, lam, eps)(0.0) < 0


def _slope_at(p: Problem, w, d, lam, eps):
    """t -> d/dt F(w + t d), piecewise linear and non-decreasing (F is convex)."""
    r, s, cd = p.A @ w + p.b + eps, p.A @ d, p.c @ d
    return lambda t: cd + 2.0 * lam * (np.maximum(r + t * s, 0.0) @ s)


def line_min(p: Problem, w, d, lam, eps, tmax: float) -> float:
    """Exact minimiser of the convex piecewise quadratic t -> F(w + t d) on [0, tmax]; always a
    finite t in [0, tmax] (0 when F does not decrease along d in floating point)."""
    r, s = p.A @ w + p.b + eps, p.A @ d
    slope = _slope_at(p, w, d, lam, eps)
    lo, v_lo = 0.0, slope(0.0)
    if not (v_lo < 0 and np.isfinite(tmax) and tmax > 0):
        return 0.0  # uphill or flat start: the interpolation below gives t < 0 or 0/0
    if slope(tmax) <= 0:
        return tmax
    with np.errstate(divide="ignore", invalid="ignore"):
        kinks = -r / s
    for t in np.unique(np.r_[kinks[(kinks > 0) & (kinks < tmax)], tmax]):
        v = slope(t)
        if v > 0:  # the slope is linear between kinks: interpolate its zero (v - v_lo > 0)
            with np.errstate(over="ignore", invalid="ignore"):
                t_star = lo + (t - lo) * (-v_lo) / (v - v_lo)
            return float(min(max(t_star, 0.0), tmax)) if np.isfinite(t_star) else lo
        lo, v_lo = t, v
    return tmax


# ---------------------------------------------------------------------------------------------
# Exact method 2 (and the SLSQP option): the smooth QP in (w, u)


def _qp(p: Problem, lam: float, eps: float):
    """min q·x + ½ xᵀQx, E x = 1, G x <= h over x = (w, u/α), scaled to O(1)."""
    K, C = p.K, p.b.size
    alpha = max(np.abs(p.A).max(initial=0.0), np.abs(p.b + eps).max(initial=0.0), 1e-12)
    scale = max(np.abs(p.c).max(initial=0.0), lam * alpha**2)
    Q = np.diag(np.r_[np.zeros(K), np.full(C, 2.0 * lam * alpha**2 / scale)])
    q = np.r_[p.c / scale, np.zeros(C)]
    E = np.r_[np.ones(K), np.zeros(C)][None]
    G = np.block([[-np.eye(K + C)], [p.A / alpha, -np.eye(C)]])
    h = np.r_[np.zeros(K + C), -(p.b + eps) / alpha]
    return Q, q, E, G, h


def interior_point(p: Problem, lam: float, eps: float, iters: int = 100) -> np.ndarray:
    """Mehrotra predictor-corrector on the QP (dense; the problem has K + C variables)."""
    Q, q, E, G, h = _qp(p, lam, eps)
    n, m = q.size, h.size
    x, y, s, z = np.zeros(n), np.zeros(1), np.ones(m), np.ones(m)
    for _ in range(iters):
        rd, rp, ri = Q @ x + q + E.T @ y + G.T @ z, E @ x - 1.0, G @ x + s - h
        mu = s @ z / m
        if max(np.abs(rd).max(), np.abs(rp).max(), np.abs(ri).max(), mu) < 1e-13:
            break
        kkt = np.block([[Q + G.T @ ((z / s)[:, None] * G), E.T], [E, np.zeros((1, 1))]])

        def newton(rc):
            sol = np.linalg.solve(kkt, np.r_[-rd - G.T @ ((z * ri - rc) / s), -rp])
            ds = -ri - G @ sol[:n]
            return sol[:n], sol[n:], ds, (-rc - z * ds) / s

        try:
            dx, dy, ds, dz = newton(s * z)  # affine-scaling predictor
            a = min(_max_step(s, ds), _max_step(z, dz))
            sigma = (((s + a * ds) @ (z + a * dz)) / m / mu) ** 3
            dx, dy, ds, dz = newton(s * z + ds * dz - sigma * mu)  # corrector
        except np.linalg.LinAlgError:
            break
        a = 0.99 * min(_max_step(s, ds), _max_step(z, dz))
        nxt = x + a * dx, y + a * dy, s + a * ds, z + a * dz
        if not all(np.isfinite(v).all() for v in nxt):
            break  # a near-singular KKT system or mu = 0 (degenerate): keep the last finite x
        x, y, s, z = nxt
    return clean(x[: p.K])


def _max_step(v, dv) -> float:
    neg = dv < 0
    return float(min(1.0, (-v[neg] / dv[neg]).min())) if neg.any() else 1.0


def slsqp(p: Problem, lam: float, eps: float) -> np.ndarray:
    """scipy's SLSQP on the same QP (the ``solver: slsqp`` option; stalls on some instances)."""
    Q, q, E, G, h = _qp(p, lam, eps)
    K, n = p.K, q.size
    x0 = np.r_[np.full(K, 1.0 / K), np.zeros(n - K)]
    x0[K:] = np.maximum(0.0, G[n:, :K] @ x0[:K] - h[n:])
    res = minimize(
        lambda x: q @ x + 0.5 * x @ Q @ x,
        x0,
        jac=lambda x: q + Q @ x,
        method="SLSQP",
        constraints=[
            {"type": "eq", "fun": lambda x: E @ x - 1.0, "jac": lambda x: E},
            {"type": "ineq", "fun": lambda x: h - G @ x, "jac": lambda x: -G},
        ],
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    return clean(res.x[:K])


def clean(w) -> np.ndarray:
    """A solver's raw output as a mixture; uniform when there is none (all zero, non-finite)."""
    w = np.clip(np.asarray(w, np.float64), 0.0, None)
    w[w < 1e-12] = 0.0
    total = w.sum()
    if not (np.isfinite(w).all() and np.isfinite(total) and total > 0):
        return np.full(w.size, 1.0 / w.size)
    return w / total
