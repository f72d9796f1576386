"""MergeMix planner: surrogates and search on known functions, and tiny end-to-end plans."""

import json

import numpy as np
import pytest
import yaml

from mixtune import config
from mixtune.errors import ConfigError
from mixtune.planners.mergemix import search
from mixtune.planners.mergemix import surrogate as sg
from mixtune.planners.mergemix.config import PlanConfig, bounds_of, objective_of
from mixtune.planners.mergemix.config import load as load_plan
from mixtune.planners.mergemix.mixture import from_ratios, ratio_scale, to_ratios
from mixtune.planners.mergemix.planner import Planner, plan

# ---------------------------------------------------------------------------------------------
# Surrogates and search (no model)

A0 = np.array([0.5, 0.3, 0.2])


def _bowl(alpha, source=""):
    """A known loss surface on the simplex with its minimum 1.0 at A0."""
    return {"d": {"loss": float(3 * ((np.asarray(alpha) - A0) ** 2).sum() + 1.0)}}


@pytest.mark.parametrize(
    "name,rounds,tol,gap", [("quadratic", 0, 0.01, 1e-3), ("gp", 1, 0.08, 0.01)]
)
def test_surrogate_and_search_recover_a_known_optimum(name, rounds, tol, gap):
    res = search.run(
        _bowl,
        3,
        objective=search.Objective({"d": 1.0}),
        bounds=[],
        surrogate=name,
        n_seeds=20,
        n_candidates=20_000,
        refit_rounds=rounds,
        top_k=4,
        seed=0,
        loo=False,
        select="surrogate",
    )
    assert np.isclose(res.alpha.sum(), 1) and np.all(res.alpha >= 0)
    assert np.abs(res.alpha - A0).sum() < tol, res.alpha
    # the value reached is near the minimum 1.0 (the surface spans 1 .. ~3.4 on the simplex)
    assert _bowl(res.alpha)["d"]["loss"] < 1.0 + gap
    assert len(res.table) == 20 + rounds * 4


def test_gbt_search_lands_near_a_known_optimum():
    """Trees are piecewise constant: coarser than smooth surrogates at N = 24, but close."""
    gaps = []
    for seed in range(4):
        res = search.run(
            _bowl,
            3,
            objective=search.Objective({"d": 1.0}),
            bounds=[],
            surrogate="gbt",
            n_seeds=20,
            n_candidates=20_000,
            refit_rounds=1,
            top_k=4,
            seed=seed,
            loo=False,
            select="surrogate",
        )
        gaps.append(_bowl(res.alpha)["d"]["loss"] - 1.0)
    # a uniformly random alpha averages a gap of ~0.64; the vertices 0.9 to 2.4
    assert np.mean(gaps) < 0.08 and max(gaps) < 0.25, gaps


def test_bounds_move_the_optimum_onto_the_feasible_side():
    def two(alpha, source=""):
        a = np.asarray(alpha)
        return {
            "t": {"loss": float(((a - A0) ** 2).sum())},
            "c": {"loss": float(a[0])},
        }  # constraint: weight on dataset 0 costs it

    obj = search.Objective({"t": 1.0})
    free = search.run(
        two,
        3,
        objective=obj,
        bounds=[],
        surrogate="quadratic",
        n_seeds=15,
        n_candidates=20_000,
        loo=False,
        select="surrogate",
    )
    bound = search.Bound("c", "loss", 0.25, upper=True)
    tied = search.run(
        two,
        3,
        objective=obj,
        bounds=[bound],
        surrogate="quadratic",
        n_seeds=15,
        n_candidates=20_000,
        loo=False,
        select="surrogate",
    )
    assert free.alpha[0] > 0.45 and tied.feasible
    assert 0.2 < tied.alpha[0] <= 0.25 + 1e-6
    # the default picks the best *measured* merge that respects the bound
    picked = search.run(
        two, 3, objective=obj, bounds=[bound], surrogate="quadratic", n_seeds=15, loo=False
    )
    ok = [t for t in picked.table if t["scores"]["c"]["loss"] <= 0.25]
    assert picked.feasible and picked.alpha[0] <= 0.25
    assert two(picked.alpha)["t"]["loss"] == min(t["scores"]["t"]["loss"] for t in ok)


class _Overshoot:
    """A surrogate exact at the measured merges and ever more optimistic away from them: the
    extrapolation failure of the benchmark (a corner predicted at 0.600 that measured 0.874)."""

    def fit(self, X, y):
        self.X, self.y = np.asarray(X, float), np.asarray(y, float)
        return self

    def predict(self, X):
        d = np.sqrt(((np.asarray(X, float)[:, None] - self.X[None]) ** 2).sum(-1))
        return self.y[d.argmin(1)] - 5.0 * d.min(1)


def test_default_picks_a_measured_merge_where_the_surrogate_extrapolates_wrongly(monkeypatch):
    monkeypatch.setattr(sg, "make", lambda name: _Overshoot())
    kw = dict(objective=search.Objective({"d": 1.0}), bounds=[], n_seeds=12, loo=False)
    faithful = search.run(_bowl, 3, n_candidates=5000, select="surrogate", **kw)
    seeds = np.array([t["alpha"] for t in faithful.table])
    best_seed = min(t["scores"]["d"]["loss"] for t in faithful.table)
    far = np.sqrt(((seeds - faithful.alpha) ** 2).sum(1)).min()
    # the faithful pick is an unmeasured point far from the data, and truly worse
    assert far > search.auto_radius(seeds) and _bowl(faithful.alpha)["d"]["loss"] > best_seed + 0.1
    picked = search.run(_bowl, 3, n_candidates=5000, **kw)
    # default: the proposal stays in the trust region, and alpha* is a measured merge
    assert picked.trust_radius == pytest.approx(search.auto_radius(seeds))
    assert np.sqrt(((seeds - picked.proposal) ** 2).sum(1)).min() <= picked.trust_radius + 1e-9
    assert [t["source"] for t in picked.table] == ["seed"] * 12 + ["proposal"]
    measured = [t["alpha"] for t in picked.table]
    assert picked.alpha.tolist() in measured and picked.selected.startswith("measured merge #")
    assert _bowl(picked.alpha)["d"]["loss"] == min(t["scores"]["d"]["loss"] for t in picked.table)
    assert _bowl(picked.alpha)["d"]["loss"] <= best_seed


def test_tied_optimum_stays_inside_the_trust_region():
    """A tree's tied optimum spanning two balls of the (non-convex) trust region: their mean
    lies in neither, so the proposal is the tied candidate nearest it."""
    cand = np.array([[1.0, 0, 0], [0, 1.0, 0], [0.5, 0.5, 0]])
    seen, util, ok = cand[:2], np.array([1.0, 1.0, 0.0]), np.ones(3, bool)
    assert search._best(cand, util, ok, np.zeros(3))[0].tolist() == [0.5, 0.5, 0]
    inside, _ = search._best(cand, util, ok, np.zeros(3), seen, 0.1)
    assert inside.tolist() in seen.tolist()


@pytest.mark.parametrize("name", ["gbt", "gp", "quadratic"])
def test_default_alpha_is_always_a_measured_merge(name):
    res = search.run(
        _bowl,
        3,
        objective=search.Objective({"d": 1.0}),
        bounds=[],
        surrogate=name,
        n_seeds=12,
        n_candidates=5000,
        refit_rounds=1,
        top_k=3,
        loo=False,
    )
    assert res.alpha.tolist() in [t["alpha"] for t in res.table]
    assert _bowl(res.alpha)["d"]["loss"] == min(t["scores"]["d"]["loss"] for t in res.table)
    assert all(r["trust_radius"] > 0 for r in res.rounds)


def _two_scales(alpha, source=""):
    """'a' has a tiny loss (a base ratio swings wildly), 'b' a large one that barely moves."""
    a = np.asarray(alpha)
    return {
        "a": {"loss": float(0.05 + 0.4 * a[0] ** 2)},
        "b": {"loss": float(3.0 + 0.1 * (1 - a[0]) + 0.05 * a[1])},
    }


def test_spread_normalisation_keeps_each_domains_share_at_its_weight(make_config):
    run = make_config()
    run["evals"][0]["name"], run["evals"][1]["name"] = "a", "b"
    base = _two_scales([0.0, 0.5, 0.5])
    table = [
        {"alpha": list(x), "scores": _two_scales(x)}
        for x in sg.seed_points(3, 20, np.random.default_rng(0))
    ]

    def shares(**objective):
        pc, rc = load_plan(None, data={"run": run, "objective": objective})
        obj = objective_of(pc, rc, base)
        return search.shares(search.by_spread(obj, table) if obj.spread else obj, table)

    # normalize: base lets the small-loss domain decide the ranking; none lets the other one
    assert shares(normalize="base")["a"] > 0.9
    assert shares(normalize="none")["a"] > 0.7
    assert shares()["a"] == pytest.approx(0.5) and shares()["b"] == pytest.approx(0.5)
    # ... unless asked: the weights are the shares
    assert shares(weights={"a": 3, "b": 1})["a"] == pytest.approx(0.75)
    # the search resolves the normalisation on the seed merges: z-scores, centred there
    res = search.run(
        _two_scales,
        3,
        objective=search.Objective({"a": 0.5, "b": 0.5}, spread=True),
        bounds=[],
        surrogate="quadratic",
        n_seeds=20,
        n_candidates=2000,
        loo=False,
    )
    seeds = [t for t in res.table if t["source"] == "seed"]
    assert not res.objective.spread
    assert search.shares(res.objective, seeds) == pytest.approx({"a": 0.5, "b": 0.5})
    zs = res.objective.value({q: search._column(seeds, *q) for q in [("a", "loss"), ("b", "loss")]})
    assert abs(zs.mean()) < 1e-9


def test_gbt_single_stump_matches_brute_force():
    rng = np.random.default_rng(0)
    X = sg.dirichlet(3, 30, rng)
    y = np.sin(5 * X[:, 0]) + X[:, 1] ** 2
    stump = sg.GBT(n_estimators=1, num_leaves=2, min_data_in_leaf=3, learning_rate=1.0)
    pred = stump.fit(X, y).predict(X)
    best = np.inf
    for f in range(3):
        for t in np.unique(X[:, f]):
            left = X[:, f] <= t
            if 3 <= left.sum() <= len(y) - 3:
                sse = ((y[left] - y[left].mean()) ** 2).sum() + (
                    (y[~left] - y[~left].mean()) ** 2
                ).sum()
                best = min(best, sse)
    assert np.isclose(((y - pred) ** 2).sum(), best)


def test_quadratic_is_exact_on_quadratic_mixture_surfaces_and_loo_says_so():
    rng = np.random.default_rng(1)
    X = sg.seed_points(4, 25, rng)
    y = X @ [1.0, 2.0, 0.5, -1.0] + 3 * X[:, 0] * X[:, 2]
    fit = sg.leave_one_out("quadratic", X, y)
    assert fit["r2"] > 0.999 and fit["rmse"] < 1e-4
    assert sg.leave_one_out("gbt", X, y)["r2"] < fit["r2"]


def test_seed_points_and_lattice():
    pts = sg.seed_points(3, 10, np.random.default_rng(0))
    assert pts.shape == (10, 3) and np.allclose(pts.sum(1), 1)
    np.testing.assert_allclose(pts[:4], np.vstack([np.eye(3), np.full((1, 3), 1 / 3)]))
    assert len(sg.lattice(3, 4)) == 15 and len(sg.lattice(4, 4)) == 35


def test_ratio_rules_and_their_inverse():
    class Info:
        def __init__(self, size, tokens):
            self.size, self.tokens = size, tokens

    infos = [Info(100, 1000), Info(100, 4000)]  # 10 vs 40 tokens per example
    summaries = [{"tokens": 500}, {"tokens": 1500}]
    alpha = np.array([0.5, 0.5])
    for rule, units, want in [
        ("identity", "examples", [0.5, 0.5]),
        ("token_weighted", "examples", [0.25, 0.75]),
        ("identity", "tokens", [0.8, 0.2]),
    ]:
        pc = PlanConfig(run={}, ratio_rule=rule, ratio_units=units)
        c = ratio_scale(pc, infos, summaries)
        w = to_ratios(alpha, c)
        np.testing.assert_allclose(w, want)
        np.testing.assert_allclose(from_ratios(w, c), alpha)


def test_bounds_from_constraint_roles_references_and_explicit_limits(make_config):
    run = make_config()
    run["evals"][0].update(role="constraint")  # add: loss <= the base model's value
    run["evals"][1].update(role="constraint", reference=2.0)  # rev: loss <= 2.0
    pc, rc = load_plan(
        None,
        data={
            "run": run,
            "constraint_slack": 0.1,
            "constraints": {"add": {"metric": "accuracy", "min": 0.5}},
        },
    )
    base = {"add": {"loss": 3.0, "accuracy": 0.2}, "rev": {"loss": 4.0}}
    got = {(b.domain, b.metric, b.upper): b.limit for b in bounds_of(pc, rc, base)}
    assert got == {
        ("add", "accuracy", False): pytest.approx(0.45),
        ("rev", "loss", True): pytest.approx(2.2),
    }
    pc2, _ = load_plan(None, data={"run": run, "constraints": {"add": "reference"}})
    assert [(b.domain, b.limit) for b in bounds_of(pc2, rc, base)] == [
        ("add", 3.0),
        ("rev", 2.0),
    ]
    pc3, _ = load_plan(None, data={"run": run, "constraint_roles": False})
    assert bounds_of(pc3, rc, base) == []


# ---------------------------------------------------------------------------------------------
# Tiny end-to-end plans


def _plan(make_config, tmp_path, **plan):
    run = make_config(max_steps=12)
    run["evals"][0]["role"] = "target"  # objective: the 'add' domain only
    raw = {
        "run": run,
        "output_dir": str(tmp_path / "plan"),
        "progress": False,
        "experts": {"steps": 6},
        "search": {"n_seeds": 6, "n_candidates": 2000, "surrogate": "quadratic"},
    }
    raw.update(plan)
    return load_plan(None, data=raw)


def test_plan_moves_the_mixture_toward_the_target_and_writes_a_train_config(make_config, tmp_path):
    pc, run = _plan(make_config, tmp_path)
    r = plan(pc, run)
    out = tmp_path / "plan"
    # the objective is the 'add' loss: the add expert must get most of the weight
    assert r["weights"]["add"] > 0.7, r["weights"]
    assert r["measured_objective"] < r["base_objective"]
    # merging at a vertex reproduces that expert's own final evaluation
    vertex = next(t for t in r["table"] if t["alpha"] == [1.0, 0.0])
    expert = json.loads((out / "experts/add/summary.json").read_text())
    assert np.isclose(
        vertex["scores"]["add"]["loss"], expert["final_eval"]["add"]["loss"], rtol=1e-5
    )
    cfg = config.load(out / "mixture.yaml")
    assert cfg.mixer.name == "fixed"
    assert np.isclose(cfg.mixer.params["weights"]["add"], r["weights"]["add"], atol=1e-6)
    assert (out / "report.md").is_file() and (out / "report.png").stat().st_size > 0
    c = r["cost"]
    merges = {tuple(np.round(t["alpha"], 6)) for t in r["table"]} | {tuple(np.round(r["alpha"], 6))}
    assert c["n_evals"] == len(merges) + 1  # + the base model
    assert c["search_tokens"] > 0 and c["token_ratio"] > 1
    assert set(r["fits"]["add"]["loss"]) >= {"r2", "rmse"}
    # same experts, another objective: accuracy (generation), alpha* = best measured merge
    r2 = plan(
        *_plan(
            make_config,
            tmp_path,
            objective={"metric": "accuracy"},
            search={"n_seeds": 6, "n_candidates": 500, "select": "measured"},
        )
    )
    accs = [t["scores"]["add"]["accuracy"] for t in r2["table"]]
    assert r2["measured"]["add"]["accuracy"] >= max(accs)
    assert r2["experts"] == r["experts"]  # reused, not retrained


def test_interrupted_plan_resumes_without_retraining_finished_experts(
    make_config, tmp_path, monkeypatch
):
    from mixtune.engine.loop import Trainer

    pc, run = _plan(make_config, tmp_path, experts={"steps": 6, "save_every": 2})
    original = Trainer.run
    calls = []

    def crash_in_rev(self, stop_after=None):
        calls.append((self.cfg.output_dir.split("/")[-1], self.resume_from))
        if calls[-1][0] == "rev" and self.resume_from is None:
            original(self, stop_after=4)  # checkpoint at step 4, then "the machine dies"
            raise KeyboardInterrupt
        return original(self, stop_after)

    monkeypatch.setattr(Trainer, "run", crash_in_rev)
    with pytest.raises(KeyboardInterrupt):
        plan(pc, run)
    add_final = tmp_path / "plan/experts/add/final"
    stamp = max(p.stat().st_mtime_ns for p in add_final.iterdir())
    calls.clear()
    r = plan(*_plan(make_config, tmp_path, experts={"steps": 6, "save_every": 2}))
    assert [name for name, _ in calls] == ["rev"]  # 'add' was not trained again
    assert calls[0][1] is not None and calls[0][1].name == "step-000004"
    assert max(p.stat().st_mtime_ns for p in add_final.iterdir()) == stamp
    assert json.loads((tmp_path / "plan/experts/rev/summary.json").read_text())["steps"] == 6
    # a third call re-trains nothing and re-evaluates nothing (cached merges)
    calls.clear()
    lines = (tmp_path / "plan/evals.jsonl").read_text().count("\n")
    again = plan(*_plan(make_config, tmp_path, experts={"steps": 6, "save_every": 2}))
    assert calls == [] and again["alpha"] == r["alpha"]
    assert (tmp_path / "plan/evals.jsonl").read_text().count("\n") == lines


def test_changed_expert_settings_in_the_same_output_dir_are_refused(make_config, tmp_path):
    planner = Planner(*_plan(make_config, tmp_path))
    for cfg in planner.expert_cfgs:  # what a started expert run leaves behind
        (tmp_path / cfg.output_dir).mkdir(parents=True)
        config.save(cfg, tmp_path / cfg.output_dir / "config.yaml")
    Planner(*_plan(make_config, tmp_path))  # same settings: fine
    # What a resume may amend (logging, the resolved packing, the logits path) is the same expert.
    for cfg in planner.expert_cfgs:
        saved = tmp_path / cfg.output_dir / "config.yaml"
        raw = yaml.safe_load(saved.read_text())
        raw["train"].update(log_every=3, packing=False, logits="full")
        saved.write_text(yaml.safe_dump(raw))
    Planner(*_plan(make_config, tmp_path))
    with pytest.raises(ConfigError, match="other settings"):
        Planner(*_plan(make_config, tmp_path, experts={"steps": 7}))


@pytest.mark.parametrize(
    "change,match",
    [
        ({"objective": {"weights": {"nope": 1}}}, "objective.weights.nope: unknown domain"),
        ({"search": {"surrogate": "xgb"}}, "search.surrogate"),
        ({"experts": {"steps": 5, "tokens": 100}}, "steps or tokens"),
        ({"constraints": {"add": {"below": 1}}}, "constraints.add"),
        ({"ratio_rule": "sqrt"}, "ratio_rule"),
    ],
)
def test_bad_plan_options_are_config_errors(make_config, tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        pc, run = _plan(make_config, tmp_path, **change)
        p = Planner(pc, run)
        bounds_of(pc, run, {"add": {"loss": 1.0}, "rev": {"loss": 1.0}})
        del p


def test_cli_bad_plan_exits_2(make_config, tmp_path, capsys):
    from mixtune.cli import main

    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"run": make_config(), "search": {"n_seeds": 1}}))
    assert main(["plan", "mergemix", str(path)]) == 2
    assert "search.n_seeds" in capsys.readouterr().err


def test_lora_plan_validates_against_real_runs_and_another_scale(make_config, tmp_path):
    from mixtune.planners import run_plan

    run = make_config(max_steps=6)
    run["model"]["lora"] = {"enabled": True, "r": 4, "alpha": 8}
    run["train"]["lr"] = 1e-2
    path = tmp_path / "plan.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run": run,
                "output_dir": str(tmp_path / "plan"),
                "progress": False,
                "experts": {"steps": 4},
                "search": {"n_seeds": 5, "n_candidates": 500, "surrogate": "gp"},
                "validate": {
                    "n_mixtures": 3,
                    "scales": {"deep": ["model.config.num_hidden_layers=3"]},
                },
            }
        )
    )
    r = run_plan("mergemix", path, validate=True)
    # LoRA experts: the vertex merge (base + dense adapter delta) is the expert itself
    expert = json.loads((tmp_path / "plan/experts/rev/summary.json").read_text())
    vertex = next(t for t in r["table"] if t["alpha"] == [0.0, 1.0])
    for d in ("add", "rev"):
        assert np.isclose(vertex["scores"][d]["loss"], expert["final_eval"][d]["loss"], rtol=1e-5)
    v = r["validation"]
    assert [m["label"] for m in v["mixtures"]] == ["mergemix", "uniform", "proportional"]
    assert set(v["real"]) == {"base", "deep"} and all(len(x) == 3 for x in v["real"].values())
    whats = {row["what"] for row in v["rank"]}
    assert {"proxy vs real (base)", "proxy vs real (deep)", "real (base) vs real (deep)"} <= whats
    assert all(-1 <= row["rho"] <= 1 for row in v["rank"])
    # rho per domain as well as on the objective, and each domain's share of the objective
    per_domain = {row["what"] for row in v["rank_by_domain"]}
    assert {f"proxy vs real ({s}), {d} loss" for s in ("base", "deep") for d in ("add", "rev")} == (
        per_domain
    )
    assert set(v["shares"]) == {"proxy", "real (base)", "real (deep)"}
    assert sum(r["objective"]["shares"].values()) == pytest.approx(1.0)
    assert r["selected_by"].startswith("measured merge #")
    assert r["alpha"] in [t["alpha"] for t in r["table"]]
    deep = config.load(tmp_path / "plan/validate/deep/uniform/config.yaml")
    assert deep.model.config["num_hidden_layers"] == 3 and deep.max_steps == 6
    assert (tmp_path / "plan/validate/validate.png").stat().st_size > 0
    assert "Spearman" in (tmp_path / "plan/validate/validate.md").read_text()
