"""Constraint references of a suite with ``reference_slack``: the base model's losses.

Per scenario *and seed* (a run's evaluation examples are a seeded draw, so each seed has its
own), measured in this process on exactly the examples the cell evaluates, and cached in
``<output_dir>/references.json`` under a fingerprint of what decides them. A cell's reference
is that loss plus the slack (:func:`~mixtune.suite.cell.cell_raw`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mixtune.suite.cell import plain, scenario_evals
from mixtune.suite.config import Scenario, Suite

REFERENCES_FORMAT = 2  # {scenario: {seed: {fingerprint, loss: {domain: v}}}}; 1 had no seeds


def _reference_raw(suite: Suite, sc: Scenario, seed: int) -> dict:
    """The run config whose step-0 evaluation is the base model on ``sc``'s cells of ``seed``."""
    raw = plain(suite.base)
    raw.update(
        output_dir=str(Path(suite.output_dir) / "_references" / f"{sc.name}-s{seed}"),
        resume="never",
        progress=False,
        seed=seed,
        datasets=plain(list(sc.datasets)),
        evals=[e for e in scenario_evals(suite, sc) if e.get("role") != "test"],
        mixer={"name": "proportional"},
    )
    return raw


def _fingerprint(raw: dict, overrides) -> str:
    """What decides the reference numbers: model, data, evaluation domains, seed, length."""
    keep = {k: raw.get(k) for k in ("model", "datasets", "evals", "seed")}
    keep["max_length"] = (raw.get("train") or {}).get("max_length")
    text = json.dumps([keep, list(overrides)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def references(suite: Suite, todo) -> dict | None:
    """{scenario: {seed: {domain: base-model loss}}} for ``reference_slack``, else None.

    ``todo``: the cells about to run; each (scenario, seed) among them is measured unless
    ``references.json`` holds it with the same fingerprint (an older format, or a changed
    scenario, is measured again).
    """
    if suite.reference_slack is None:
        return None
    path = Path(suite.output_dir) / "references.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if cache.get("format") != REFERENCES_FORMAT:
        cache = {"format": REFERENCES_FORMAT}
    wanted = {(c.scenario.name, c.seed): c.scenario for c in todo}
    missing = []
    for (name, seed), sc in wanted.items():
        fp = _fingerprint(_reference_raw(suite, sc, seed), sc.overrides)
        if cache.get(name, {}).get(str(seed), {}).get("fingerprint") != fp:
            missing.append((sc, seed, fp))
    if missing:
        import torch

        from mixtune import config
        from mixtune.engine.loop import Trainer

        threads = torch.get_num_threads()
        torch.set_num_threads(suite.threads)
        try:
            for sc, seed, fp in missing:
                cfg = config.load(data=_reference_raw(suite, sc, seed), overrides=sc.overrides)
                metrics = Trainer(cfg, writer=False).evaluate(accuracy=False, use_cache=False)
                cache.setdefault(sc.name, {})[str(seed)] = {
                    "fingerprint": fp,
                    "loss": {d: float(v["loss"]) for d, v in metrics.items()},
                }
        finally:
            torch.set_num_threads(threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1))
    return {
        name: {int(seed): entry["loss"] for seed, entry in by_seed.items()}
        for name, by_seed in cache.items()
        if name != "format"
    }
