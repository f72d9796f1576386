"""Does the merged proxy rank mixtures like real training does? (and across model scales)

For a set of mixtures α (MergeMix's α*, uniform, proportional, then Dirichlet(1) draws, or the
user's list), compare three scores of the plan's objective:

- ``surrogate``: the surrogate prediction at α (fit on the plan's merged evaluations);
- ``proxy``: the merged model θ_0 + Σ α_k τ_k, evaluated;
- ``real``: a model trained from the base on the mixture ratios of α (the plan's ratio rule)
  for ``validate.steps`` steps — at the plan's scale and at every ``validate.scales`` entry
  (config overrides such as a deeper ``model.config``: cross-scale transfer).

Reports Spearman ρ (scipy) between proxy and real at each scale, between the real rankings of
two scales, and where MergeMix's mixture ranks. Every real run is a normal run directory under
``<plan>/validate/<scale>/<mixture>``; finished ones are reused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from mixtune import config as config_mod
from mixtune import rawconfig
from mixtune.errors import ConfigError
from mixtune.planners.mergemix import search
from mixtune.planners.mergemix.config import PlanConfig
from mixtune.planners.mergemix.experts import eval_raw, finished
from mixtune.planners.mergemix.mixture import from_ratios, mixture_config, to_ratios
from mixtune.planners.mergemix.planner import Planner, plan
from mixtune.simplex import normalize

log = logging.getLogger(__name__)


def mixtures(p: Planner, result: dict) -> list[tuple[str, np.ndarray]]:
    vc, names = p.pc.validate, p.names
    out: list[tuple[str, np.ndarray]] = [("mergemix", np.asarray(result["alpha"]))]
    uniform = np.full(len(names), 1.0 / len(names))
    sizes = np.array([i.size for i in p.infos], np.float64)
    out += [
        ("uniform", from_ratios(uniform, p.c)),
        ("proportional", from_ratios(sizes / sizes.sum(), p.c)),
    ]
    for i, m in enumerate(vc.mixtures):  # explicit merge weights, optionally labelled
        where = f"validate.mixtures[{i}]"
        if isinstance(m.get("weights"), dict):
            label, m = str(m.get("label", f"m{i + 1}")), m["weights"]
        else:
            label = f"m{i + 1}"
        if label in [x for x, _ in out]:
            raise ConfigError(f"{where}.label: '{label}' is used twice")
        out.append((label, normalize(m, names, what=where)))
    rng = np.random.default_rng([p.run.seed, 7])
    n = max(vc.n_mixtures - len(out), 0)
    out += [(f"d{i + 1}", a) for i, a in enumerate(rng.dirichlet(np.ones(len(names)), n))]
    return out


def real_config(p: Planner, weights: dict, out: Path, steps: int, overrides) -> object:
    raw = mixture_config(
        p.run,
        weights,
        output_dir=str(out),
        max_steps=steps,
        resume="auto",
        progress=p.pc.progress,
        report_to=[],
        evals=eval_raw(p.run, p.accuracy),
    )
    raw["train"]["eval_every"] = 0  # only step 0 and the end: the final score is what counts
    for item in overrides:
        rawconfig.apply_override(raw, item)
    return config_mod.from_dict(raw)


def validate_plan(
    pc: PlanConfig, run, result: dict | None = None, planner: Planner | None = None
) -> dict:
    """Plan (or reuse the plan), then train every validation mixture and compare rankings."""
    from scipy.stats import spearmanr
    from tqdm.auto import tqdm

    from mixtune.engine.loop import Trainer
    from mixtune.planners.mergemix import report

    p = planner or Planner(pc, run)
    if result is None:
        result = plan(pc, run, p)
    if not p.ready:
        p.prepare()
    o = result["objective"]  # the objective the plan used (spread normalisation resolved)
    p.objective = search.Objective(o["weights"], o["metric"], o.get("center"))
    mix = mixtures(p, result)
    need = search.quantities(p.objective, [])
    models = search.fit_all(pc.search.surrogate, result["table"], need)
    A = np.array([a for _, a in mix])
    sur = p.objective.value({q: m.predict(A) for q, m in models.items()})
    proxy_scores = [p.evaluator(a, "validate") for _, a in mix]
    proxy = [p.value(sc) for sc in proxy_scores]
    p.evaluator.restore()
    steps = pc.validate.steps or run.max_steps
    scales = {"base": [], **{k: list(v) for k, v in (pc.validate.scales or {}).items()}}
    real: dict[str, list[float]] = {}
    real_scores: dict[str, list[dict]] = {}
    jobs = [(s, label, a) for s in scales for label, a in mix]
    for s, label, a in tqdm(
        jobs, desc="validation runs", unit="run", disable=not pc.progress, dynamic_ncols=True
    ):
        w = dict(zip(p.names, to_ratios(a, p.c).tolist()))
        out = Path(pc.output_dir) / "validate" / s / label
        if not finished(out):
            Trainer(real_config(p, w, out, steps, scales[s])).run()
        final = json.loads((out / "summary.json").read_text())["final_eval"]
        real.setdefault(s, []).append(p.value(final))
        real_scores.setdefault(s, []).append(final)

    def rho(x, y, what):
        r = spearmanr(x, y)
        return {"what": what, "rho": float(r.statistic), "p": float(r.pvalue)}

    rank = []
    for s in scales:
        rank += [
            rho(proxy, real[s], f"proxy vs real ({s})"),
            rho(sur, real[s], f"surrogate vs real ({s})"),
        ]
        if s != "base":
            rank.append(rho(real["base"], real[s], f"real (base) vs real ({s})"))
    metric = p.objective.metric
    by_domain = [
        rho(
            [x[d][metric] for x in proxy_scores],
            [x[d][metric] for x in real_scores[s]],
            f"proxy vs real ({s}), {d} {metric}",
        )
        for s in scales
        for d in proxy_scores[0]
        if metric in proxy_scores[0][d] and all(metric in x[d] for x in real_scores[s])
    ]
    sign = 1 if metric == "loss" else -1
    quality = {}
    for s in scales:
        ys = np.array(real[s]) * sign
        labels = [label for label, _ in mix]
        others = [y for label, y in zip(labels, ys) if label != "mergemix"]
        quality[s] = {
            "mergemix": real[s][0],
            "uniform": real[s][1],
            "proportional": real[s][2],
            "best_other": float(sign * min(others)),
            "mergemix_rank": int(1 + (ys < ys[0]).sum()),
        }
    v = {
        "datasets": p.names,
        "metric": p.objective.metric,
        "steps": steps,
        "mixtures": [
            {
                "label": label,
                "alpha": a.tolist(),
                "surrogate": float(s),
                "proxy": float(x),
                "proxy_scores": sc,
            }
            for (label, a), s, x, sc in zip(mix, sur, proxy, proxy_scores)
        ],
        "real": real,
        "real_scores": real_scores,
        "rank": rank,
        "rank_by_domain": by_domain,
        "quality": quality,
        # each domain's share of the objective's spread over the validated mixtures
        "shares": {
            "proxy": search.shares(p.objective, [{"scores": x} for x in proxy_scores]),
            **{
                f"real ({s})": search.shares(p.objective, [{"scores": x} for x in real_scores[s]])
                for s in scales
            },
        },
    }
    out = Path(pc.output_dir) / "validate"
    out.mkdir(parents=True, exist_ok=True)
    (out / "validate.json").write_text(json.dumps(v, indent=1))
    report.write_validation(out, v)
    return v
