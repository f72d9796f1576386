"""The slope matrix S of a DynaMiCS update, and how much of it is noise.

S_ij is the change per step of evaluation domain i's loss-like value (an accuracy enters as
−accuracy) when training on dataset j alone. It is measured by probing (:func:`from_probes`:
c_t steps on D_j from a snapshot, then restored) or, as the paper's App. L baseline, by
gradient alignment (:func:`from_gradient_alignment`: −η⟨g_i, d_j⟩, first order).

Noise (beyond the paper, which lists noise-aware slopes as future work): anchors and probes are
evaluated on the same examples, so every slope's standard error is paired over them
(:func:`paired_se`: what the probe did, not which examples were drawn), and
:func:`noise_notes` says in plain words when the noise, not the mixture, would decide a
constraint.
"""

from __future__ import annotations

import logging

import numpy as np

from mixtune.errors import MixtuneError
from mixtune.eval.constraints import loss_like, native
from mixtune.eval.domains import loss_se, mean_se
from mixtune.mixers.base import DomainInfo, MixContext

log = logging.getLogger(__name__)


def value(m: dict, d: DomainInfo) -> float:
    """Domain ``d``'s loss-like value in its evaluation result ``m``.

    Monitors are followed in loss (their accuracy is not evaluated in probes)."""
    return loss_like(m, "loss" if d.role == "monitor" else d.metric, d.name)


def value_se(m: dict, d: DomainInfo) -> float:
    """Standard error of :func:`value` over the evaluated examples (NaN if unknown)."""
    sc = m.get("scores")
    if d.role != "monitor" and d.metric == "accuracy":
        return float("nan") if sc is None or sc.correct is None else mean_se(sc.correct)
    return float(m.get("loss_se", float("nan")))


def paired_se(before: dict, after: dict, d: DomainInfo) -> float:
    """Standard error of the change after − before of domain ``d``'s value, paired over
    the same examples (what the probe did, not which examples were drawn)."""
    a, b = after.get("scores"), before.get("scores")
    if a is None or b is None or a.nll.size != b.nll.size:
        return float("nan")
    if d.role != "monitor" and d.metric == "accuracy":
        if a.correct is None or b.correct is None:
            return float("nan")
        return mean_se(b.correct - a.correct)  # loss-like: −accuracy
    return loss_se(a.nll - b.nll, b.tokens)


def from_probes(
    ctx: MixContext,
    domains: list[DomainInfo],
    n_datasets: int,
    now: dict,
    L: np.ndarray,
    c: int,
    batches: int,
    accuracy: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """S and its standard errors, (M, K) each, from one probe of ``c`` steps per dataset:
    S_ij = (L_i after − L_i now) / c, with ``now`` the anchors' evaluation and ``L`` their
    values; each probe evaluates ``batches`` batches per domain, the anchors' examples.

    The probes are the long silent part of an update (K short training runs, each followed by
    an evaluation): each says which dataset it is on, so a slow update shows where it is."""
    M, K = len(domains), n_datasets
    S, S_se = np.zeros((M, K)), np.zeros((M, K))
    for j in range(K):
        log.info(
            "dynamics: step %d, probing %d/%d: %s (%d step%s)",
            ctx.step,
            j + 1,
            K,
            ctx.datasets[j].name,
            c,
            "" if c == 1 else "s",
        )
        after = ctx.probe(j, c, batches, accuracy=accuracy, per_example=True)
        for i, d in enumerate(domains):
            S[i, j] = (value(after[d.name], d) - L[i]) / c
            S_se[i, j] = paired_se(now[d.name], after[d.name], d) / c
    return S, S_se


def from_gradient_alignment(
    ctx: MixContext, n_domains: int, n_datasets: int, batches: int, batch_size: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """S = −η⟨g_i, d_j⟩ from the loop's gradient alignment (``batches`` evaluation batches per
    domain, ``batch_size`` examples of each dataset); no per-example noise estimate (NaN)."""
    M, K = n_domains, n_datasets
    if getattr(ctx, "grad_alignment", None) is None:
        raise MixtuneError(
            "slopes: gradient_alignment needs ctx.grad_alignment, which "
            "this training loop does not provide"
        )
    S = np.asarray(ctx.grad_alignment(batches, batch_size=batch_size), np.float64)
    return S.reshape(M, K), np.full((M, K), np.nan)


def noise_notes(
    domains: list[DomainInfo],
    constraints: list[int],
    skip: list[str],
    now: dict,
    L: np.ndarray,
    L_se: np.ndarray,
    S: np.ndarray,
    S_se: np.ndarray,
    refs: np.ndarray,
    H: int,
) -> dict[str, str]:
    """``{constraint: warning}``, in plain words, for the constraints (except those named in
    ``skip``) that noise rather than the mixture would decide: every dataset moves it past its
    reference by more than the reference's own noise, or no dataset moves it by more than the
    probes' noise."""
    notes = {}
    for i in constraints:
        d = domains[i]
        if d.name in skip or not np.isfinite(L_se[i]):
            continue
        move, noise = H * S[i], H * S_se[i]
        n = now[d.name].get("n", "?")
        unit = "accuracy" if d.metric == "accuracy" else "loss"
        base = f"{native(refs[i], d.metric):.3f} ± {L_se[i]:.3f} on {n} examples"
        if np.all(move + L[i] - refs[i] > L_se[i]):
            notes[d.name] = (
                f"{d.name}: reference {unit} {base}; every dataset moves it past "
                f"the reference by more than its noise; raise evals.{d.name}."
                "batches or set a tolerance (evals[].reference)"
            )
        elif np.all(np.isfinite(noise)) and np.all(np.abs(move) < 2 * noise):
            notes[d.name] = (
                f"{d.name}: no dataset moves it by more than the probes' noise "
                f"(largest predicted change {np.abs(move).max():.4f} vs ± "
                f"{noise.max():.4f}); raise evals.{d.name}.batches or "
                "mixer.probe_batches"
            )
    return notes
