"""The fixed-weight baselines of the DynaMiCS paper (§1.6) as a suite method: ``sweep:``.

A sweep ``{masses: [0, 0.2, 0.5, 0.8, 1], schemes: [uniform, proportional]}`` is one ``fixed``
mixer per (scheme, target mass w), resolved per scenario by :func:`sweep_weights`: w is split
over the target datasets (named like a target domain) equally or by sample counts, 1 - w
equally over the other datasets. Expansion into rows: :func:`mixtune.suite.config.methods_of`;
shared cells: :func:`mixtune.suite.cell.cells`; the best-single and oracle rows:
:mod:`mixtune.suite.table`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mixtune.errors import ConfigError, MixtuneError

if TYPE_CHECKING:
    from mixtune.suite.config import Scenario


@dataclass(frozen=True)
class Sweep:
    """The paper's fixed-weight baselines: every (scheme, target mass) pair is one fixed mixer."""

    masses: tuple[float, ...] = (0.0, 0.2, 0.5, 0.8, 1.0)
    """Total weight w of the target datasets; 1 - w goes equally to the other datasets."""
    schemes: tuple[Literal["uniform", "proportional"], ...] = ("uniform", "proportional")
    """How w is split over the target datasets: equally, or by sample counts."""

    def __post_init__(self):
        if not self.masses or not self.schemes:
            raise ConfigError("sweep: needs at least one mass and one scheme")
        if any(not 0 <= w <= 1 for w in self.masses):
            raise ConfigError(f"sweep.masses: must be in [0, 1], got {list(self.masses)}")
        if len(set(self.masses)) < len(self.masses) or len(set(self.schemes)) < len(self.schemes):
            raise ConfigError("sweep: masses and schemes must not repeat")


@dataclass(frozen=True)
class SweepPoint:
    family: str  # the sweep method's name
    scheme: str
    mass: float


def sweep_weights(sc: Scenario, point: SweepPoint) -> dict[str, float]:
    """A sweep member's ``fixed`` weights in scenario ``sc`` (rounded; they sum to 1).

    Target datasets (named like a target domain) share the mass w equally or by sample counts;
    the others share 1 - w equally (w = 1 when there are none).
    """
    targets = {e["name"] for e in sc.evals if e.get("role") == "target"}
    tds = [d for d in sc.datasets if d["name"] in targets]
    others = [d["name"] for d in sc.datasets if d["name"] not in targets]
    if not tds:
        raise ConfigError(
            f"methods.{point.family}.sweep: needs a training dataset named like a "
            f"target domain in scenario {sc.name}"
        )
    mass = point.mass if others else 1.0
    counts = [_train_size(d, sc) if point.scheme == "proportional" else 1 for d in tds]
    w = {d["name"]: mass * c / sum(counts) for d, c in zip(tds, counts)}
    w.update({n: (1 - mass) / len(others) for n in others})
    return {n: round(v, 6) for n, v in w.items()}


def _train_size(d: dict, sc: Scenario) -> int:
    """Training examples of dataset ``d``: ``max_examples``, else its records less holdouts."""
    if d.get("max_examples") is not None:
        return d["max_examples"]
    try:
        n = _n_records(d["path"], d.get("split", "train"), d.get("subset"))
    except MixtuneError as e:
        raise ConfigError(
            f"sweep (proportional scheme): cannot count the examples of dataset "
            f"'{d['name']}' ({e}); give it max_examples"
        ) from None
    for e in sc.evals:
        if e.get("from_dataset") == d["name"]:
            h = e.get("holdout", 0.1)
            n -= int(h) if h >= 1 else max(1, round(h * n))
    return max(n, 1)


@functools.cache
def _n_records(path: str, split: str, subset: str | None) -> int:
    from mixtune.data.sources import read_records

    return len(read_records(path, split, subset, "datasets"))
