"""MergeMix reports: ``report.md`` + ``report.png`` of a plan, ``validate.md`` + ``.png``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _f(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _table(headers: list[str], rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *["| " + " | ".join(str(c) for c in row) + " |" for row in rows],
    ]


def write(out: Path, r: dict) -> None:
    names, obj = r["datasets"], r["objective"]
    direction = "minimise" if obj["metric"] == "loss" else "maximise"
    terms = " + ".join(f"{w:.3g}·{d}" for d, w in obj["weights"].items())
    if obj.get("normalize") == "base":
        terms += " (weights divided by the base model's values)"
    elif obj.get("normalize") == "spread":
        terms = " + ".join(
            f"{w:.3g}·({d} − {obj['center'][d]:.4g})" for d, w in obj["weights"].items()
        )
        terms += " (z-scores: centred on the seed merges' mean, divided by their sd)"
    lines = [
        f"# MergeMix plan: {out}",
        "",
        f"Objective: {direction} {terms} ({obj['metric']}); surrogate `{r['surrogate']}`; "
        f"ratio rule `{r['ratio_rule']}` in {r['ratio_units']}.",
        "",
    ]
    if obj.get("shares"):
        lines += [
            "Each domain's share of the objective's spread over the measured merges "
            "(|w|·sd / Σ|w|·sd): "
            + ", ".join(f"{d} {v:.2f}" for d, v in obj["shares"].items())
            + ".",
            "",
        ]
    if r["bounds"]:
        lines += [
            "Bounds (on the surrogate predictions): "
            + ", ".join(
                f"{b['domain']} {b['metric']} {'<=' if b['upper'] else '>='} {b['limit']:.4f}"
                for b in r["bounds"]
            )
            + (
                ""
                if r["feasible"]
                else " — **no candidate met them all; alpha* minimises the violation**"
            ),
            "",
        ]
    lines += ["## Chosen mixture", ""]
    lines += _table(
        ["dataset", "alpha*", "train weight"],
        [[n, _f(a), _f(r["weights"][n])] for n, a in zip(names, r["alpha"])],
    )
    lines += [
        "",
        f"alpha* selected by: {r['selected_by']}. Objective at alpha*: predicted by the "
        f"surrogate {_f(r['predicted_objective'])}, measured on the merged model "
        f"{_f(r['measured_objective'])}; the surrogate's proposal "
        f"({', '.join(_f(a, 3) for a in r['proposal']['alpha'])}; trust radius "
        f"{_f(r.get('trust_radius'), 3) if r.get('trust_radius') else 'none'}) measured "
        f"{_f(r['proposal']['measured_objective'])}; base model {_f(r['base_objective'])}; "
        f"best evaluated merge {_f(_best(r)['objective'])}.",
        "",
        f"Ready-to-run config: `{r['mixture_yaml']}`.",
        "",
        "## Experts",
        "",
    ]
    doms = list(r["base"])
    lines += _table(
        ["expert", "steps", "tokens", "seconds", *[f"{d} loss" for d in doms]],
        [
            [
                e["name"],
                e["steps"],
                e["tokens"],
                _f(e["seconds"], 1),
                *[_f((e["final_eval"] or {}).get(d, {}).get("loss")) for d in doms],
            ]
            for e in r["experts"]
        ],
    )
    lines += ["", f"## Surrogate fit quality (leave-one-out over {len(r['table'])} merges)", ""]
    rows = []
    for d, per in r["fits"].items():
        for m, f in per.items():
            ys = [t["scores"][d][m] for t in r["table"]]
            rows.append([d, m, _f(f["r2"], 3), _f(f["rmse"]), _f(max(ys) - min(ys))])
    lines += _table(["domain", "metric", "LOO R²", "LOO RMSE", "measured range"], rows)
    lines += ["", "## Merged evaluations", ""]
    lines += _table(
        ["#", "source", *names, "objective", *[f"{d} loss" for d in doms]],
        [
            [
                i,
                t["source"],
                *[_f(a, 3) for a in t["alpha"]],
                _f(t["objective"]),
                *[_f(t["scores"][d]["loss"]) for d in doms],
            ]
            for i, t in enumerate(r["table"])
        ],
    )
    c = r["cost"]
    lines += [
        "",
        "## Cost",
        "",
        f"- search: {len(names)} experts, {c['expert_steps']} steps, "
        f"{c['search_tokens']:,} supervised tokens, {c['expert_seconds']:.0f} s training; "
        f"{c['n_evals']} merged evaluations, {c['eval_seconds']:.0f} s.",
        f"- grid it replaces: {c['grid_runs']} full mixture runs (shares in steps of "
        f"1/{c['grid_resolution']}), ~{c['grid_tokens']:,} tokens, ~"
        f"{c['grid_seconds_est']:.0f} s (estimated from the experts' s/step).",
        f"- ratio: {c['token_ratio']:.1f}x fewer training tokens; "
        f"~{c['seconds_ratio_est']:.1f}x less time (search {c['search_seconds']:.0f} s).",
        "",
    ]
    _plot(out / "report.png", r)
    lines += ["![plan](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def _best(r: dict) -> dict:
    sign = 1 if r["objective"]["metric"] == "loss" else -1
    return min(r["table"], key=lambda t: sign * t["objective"])


def _plot(path: Path, r: dict) -> None:
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for d, per in r["fits"].items():
        for m, f in per.items():
            ys = [t["scores"][d][m] for t in r["table"]]
            ax[0].scatter(ys, f["pred"], s=14, label=f"{d} {m} (R²={f['r2']:.2f})")
    lo, hi = ax[0].get_xlim()
    ax[0].plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax[0].set(title="surrogate: leave-one-out", xlabel="measured", ylabel="predicted")
    ax[0].legend(fontsize=7)
    names, x = r["datasets"], range(len(r["datasets"]))
    ax[1].bar([i - 0.2 for i in x], r["alpha"], 0.4, label="alpha*")
    ax[1].bar([i + 0.2 for i in x], [r["weights"][n] for n in names], 0.4, label="train weight")
    ax[1].set_xticks(list(x), names, rotation=30, fontsize=8)
    ax[1].set(title="chosen mixture")
    ax[1].legend(fontsize=8)
    objs = [t["objective"] for t in r["table"]]
    ax[2].plot(range(len(objs)), objs, "o", ms=4, label="evaluated merges")
    ax[2].axhline(r["measured_objective"], color="C3", label="alpha* (merged)")
    ax[2].axhline(r["base_objective"], color="k", ls=":", label="base model")
    ax[2].set(
        title="objective of merged models", xlabel="evaluation #", ylabel=r["objective"]["metric"]
    )
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_validation(out: Path, v: dict) -> None:
    lines = [
        f"# MergeMix validation: {out}",
        "",
        f"Objective ({v['metric']}): merged proxy vs models trained for {v['steps']} steps "
        "on each mixture.",
        "",
    ]
    scales = list(v["real"])
    lines += _table(
        ["mixture", *v["datasets"], "surrogate", "merged proxy", *[f"real ({s})" for s in scales]],
        [
            [
                m["label"],
                *[_f(a, 3) for a in m["alpha"]],
                _f(m["surrogate"]),
                _f(m["proxy"]),
                *[_f(v["real"][s][i]) for s in scales],
            ]
            for i, m in enumerate(v["mixtures"])
        ],
    )
    lines += ["", "| comparison | Spearman ρ | p |", "|---|---|---|"]
    for row in v["rank"] + v.get("rank_by_domain", []):
        lines.append(f"| {row['what']} | {_f(row['rho'], 3)} | {_f(row['p'], 3)} |")
    lines += [""]
    for what, sh in v.get("shares", {}).items():
        lines.append(
            f"- objective share per domain, {what}: "
            + ", ".join(f"{d} {x:.2f}" for d, x in sh.items())
        )
    for s, q in v["quality"].items():
        lines.append(
            f"- real objective at scale {s}: "
            + ", ".join(f"{k} {x}" if isinstance(x, int) else f"{k} {_f(x)}" for k, x in q.items())
        )
    lines += ["", "![validation](validate.png)", ""]
    (out / "validate.md").write_text("\n".join(lines))
    scales = list(v["real"])
    fig, ax = plt.subplots(1, len(scales), figsize=(5.2 * len(scales), 4.2), squeeze=False)
    for a, s in zip(ax[0], scales):
        xs, ys = [m["proxy"] for m in v["mixtures"]], v["real"][s]
        a.scatter(xs, ys)
        for m, x, y in zip(v["mixtures"], xs, ys):
            a.annotate(m["label"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        rho = next(r["rho"] for r in v["rank"] if r["what"] == f"proxy vs real ({s})")
        a.set(
            title=f"{s}: Spearman ρ = {_f(rho, 2)}",
            xlabel=f"merged proxy {v['metric']}",
            ylabel=f"trained {v['metric']}",
        )
    fig.tight_layout()
    fig.savefig(out / "validate.png", dpi=100)
    plt.close(fig)
