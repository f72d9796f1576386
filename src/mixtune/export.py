"""``mixtune export``: a run's model at one of its kept steps as a ``from_pretrained`` directory.

A run keeps the trainable weights of its checkpoints (``checkpoints/step-N/``) and of the
evaluated steps its answer may need (``checkpoints/weights/step-N/``, engine/answer.py); they
hold tensors by parameter name, not a loadable model. Export rebuilds the run's model from its
``config.yaml`` (the base model and LoRA setting), copies in the step's weights, and saves the
model (or the LoRA adapter, or the adapter merged into its base) with the tokenizer, the chat
template the run trained with, and a README.md model card: the data mixture (datasets, the
weights at the step and their mean up to it, the weights' trajectory) and how every evaluation
domain stood against its reference at that step.

An un-merged adapter names its base as an absolute directory or a hub name
(:func:`mixtune.engine.build.base_reference`), so ``AutoPeftModelForCausalLM`` loads it from any
working directory. A base built at random from ``model.config``, or read from a GGUF file, has
no such name: such adapters are exported merged (``--merge-lora``) or refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from mixtune.engine.answer import WEIGHTS, kept_steps, weights_dir
from mixtune.errors import ConfigError

PREFIX = "step-"


def locate(target: str | Path) -> tuple[Path, int | None]:
    """``(run directory, step)`` of a path naming a run (step None) or one of its kept steps
    (``RUN/checkpoints/step-N`` or ``RUN/checkpoints/weights/step-N``)."""
    p = Path(target)
    name = p.name
    if name.startswith(PREFIX) and name[len(PREFIX) :].isdigit():
        parent = p.parent
        if parent.name == WEIGHTS:
            parent = parent.parent
        run = parent.parent
        if parent.name != "checkpoints" or not (run / "config.yaml").is_file():
            raise ConfigError(
                f"{target}: a step directory outside a run directory (no config.yaml above "
                "its checkpoints/); give the run directory"
            )
        return run, int(name[len(PREFIX) :])
    if not (p / "config.yaml").is_file():
        raise ConfigError(
            f"{target} is not a run directory (no config.yaml) or a checkpoint of one "
            "(RUN/checkpoints/step-N)"
        )
    return p, None


def answer_step(run: Path) -> int | None:
    """The step ``final/`` holds (0: the base model), per ``final/selection.json``; None when
    the run has none (a run without target or constraint domains, or one from before)."""
    path = run / "final" / "selection.json"
    if not path.is_file():
        return None
    try:
        step = json.loads(path.read_text())["step"]
        return 0 if step is None else int(step)
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{path} is not a selection record (damaged, or edited by hand); name the step "
            "with --step N"
        ) from None


def newest_kept(run: Path) -> Path | None:
    """Where the weights of the run's last kept step are (None: it keeps none)."""
    kept = kept_steps(run)
    return weights_dir(run, kept[-1]) if kept else None


def load_step(run: Path, step: int, model) -> str:
    """Copy the trainable weights of ``step`` of ``run`` into ``model`` (built from the run's
    config); returns where they came from. Step 0 without a kept copy is the base model as
    built."""
    found = _read_whole(run, lambda: weights_dir(run, step), model)
    if found is None and step == 0:
        return "base model"
    if found is None:
        raise ConfigError(
            f"{run}: the weights of step {step} are not kept; steps kept: {kept_steps(run)} "
            "(evaluated steps keep theirs when best so far; set train.save_every to keep more)"
        )
    return str(found)


def load_newest(run: Path, model) -> str | None:
    """Copy the trainable weights of ``run``'s newest intact checkpoint into ``model``; returns
    its path (None: the run has no checkpoint)."""
    from mixtune.engine import checkpoint

    found = _read_whole(run, lambda: ([None, *checkpoint.complete(run / "checkpoints")])[-1], model)
    return None if found is None else str(found)


TRIES = 5
"""How many times a reader chooses again when a train rotates its choice away mid-read."""


def _read_whole(run: Path, choose, model) -> Path | None:
    """Load the weights of the directory ``choose()`` names into ``model``, as a reader running
    beside a train that rotates its checkpoints: a directory deleted under the read (rotation
    renames it away first, so it is whole or gone) is chosen again, up to :data:`TRIES` times.
    A directory still there that fails is bad input, as always (exit 2, one line)."""
    from mixtune.engine import checkpoint

    for _ in range(TRIES):
        path = None
        try:
            path = choose()
            if path is not None:
                checkpoint.load_trainable(path, model)
            return path
        except (ConfigError, OSError) as e:
            if path is None or not path.is_dir():
                continue  # rotated away under the read: choose again
            if isinstance(e, ConfigError):
                raise  # damaged in place
            raise ConfigError(f"{path}: cannot be read ({e})") from None
        except RuntimeError as e:  # a tensor of another shape: not the model config.yaml builds
            raise ConfigError(
                f"{path} does not fit the model {run / 'config.yaml'} describes ({_first(e)}); "
                "was config.yaml edited? restore it"
            ) from None
    raise ConfigError(
        f"{run}: the weights chosen were deleted while being read, {TRIES} times (a train "
        "rotating checkpoints faster than they can be read); retry, or raise its "
        "train.keep_checkpoints"
    )


def _first(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def run_config(run: Path):
    """The run's config, with its output directory pointed away (nothing of the run is
    written)."""
    from mixtune import config

    scratch = Path(tempfile.gettempdir()) / "mixtune-export-unused"
    return config.load(run / "config.yaml", ["resume=never", f"output_dir={scratch}"])


def export(target: str | Path, out: str | Path, step: int | None = None, merge_lora: bool = False):
    """Write the model of ``target`` (a run, or one of its step directories) at ``step``
    (default: the step the path names, else the run's answer) to the new directory ``out``;
    returns ``(out, step)``."""
    from mixtune.data.tokenize import resolve_template
    from mixtune.engine import build, safewrite

    run, named = locate(target)
    # Default: the run's answer, else its last kept step (chosen when read, below).
    step = step if step is not None else named if named is not None else answer_step(run)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory {out} is a file; choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {out} exists and is not an empty directory")
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {out}: {parent} is not writable")
    cfg = run_config(run)
    lora = cfg.model.lora.enabled
    if merge_lora and not lora:
        raise ConfigError(
            f"--merge-lora: {run} trained the whole model (model.lora.enabled is false); "
            "export it without --merge-lora"
        )
    base = None
    if lora and not merge_lora:
        base = build.base_reference(cfg.model)
        if base is None:
            raise ConfigError(_no_base(cfg.model, run))
    tokenizer = build.load_tokenizer(cfg.model)
    model = build.load_model(cfg.model, tokenizer, cfg.seed, build.pick_dtype(cfg.model.dtype))
    if step is not None:
        source = load_step(run, step, model)
    else:  # the newest kept step, chosen again if a train rotates it away under the read
        found = _read_whole(run, lambda: newest_kept(run), model)
        if found is None:
            raise ConfigError(f"{run} keeps no weights (no checkpoints/): nothing to export")
        step, source = int(found.name[len(PREFIX) :]), str(found)
    if lora and merge_lora:
        model = model.merge_and_unload()
    tokenizer.chat_template = resolve_template(tokenizer, cfg.model.chat_template, quiet=True)
    card = model_card(run, cfg, step, source, lora=lora, merged=merge_lora, base=base)
    # Whole or not at all: written beside OUT and renamed into place.
    with safewrite.writing("the exported model", out), safewrite.atomic_dir(out) as tmp:
        build.save_final(model, tokenizer, tmp, base=base)
        (tmp / "README.md").write_text(card)
    return out, step


def _no_base(model_cfg, run: Path) -> str:
    if model_cfg.config is not None:
        return (
            f"{run} trained a LoRA adapter on a model built at random from model.config, which "
            "exists nowhere for the adapter to name as its base: export with --merge-lora"
        )
    return (
        f"{run} trained a LoRA adapter on the GGUF file {model_cfg.gguf_file} "
        f"({model_cfg.name_or_path}), which from_pretrained cannot load as an adapter's base: "
        "export with --merge-lora, or convert it once (mixtune convert-gguf) and train from "
        "that directory"
    )


# -- the model card ------------------------------------------------------------------------------
def mixture(records: list[dict], names: list[str], step: int) -> dict:
    """The weights the steps 1..``step`` were drawn with, as ``metrics.jsonl`` logged them (a
    record's weights are in effect from its step on, until the next record): ``at`` (step
    ``step``'s), ``mean`` (over those steps) and ``changes`` (``(step, weights)`` where they
    changed)."""
    changes: list[tuple[int, list[float]]] = []
    for r in sorted((r for r in records if "weights" in r), key=lambda r: r["step"]):
        if r["step"] >= step:
            break
        w = [float(r["weights"].get(n, 0.0)) for n in names]
        if not changes or changes[-1][1] != w:
            changes.append((r["step"], w))
    if not changes:
        return {"at": None, "mean": None, "changes": []}
    total = [0.0] * len(names)
    for i, (s, w) in enumerate(changes):
        until = changes[i + 1][0] if i + 1 < len(changes) else step
        total = [t + x * (until - s) for t, x in zip(total, w)]
    return {
        "at": changes[-1][1],
        "mean": [t / step for t in total],
        "changes": changes,
    }


def model_card(
    run: Path, cfg, step: int, source: str, lora: bool, merged: bool, base: str | None
) -> str:
    """README.md of an exported model (see the module docstring)."""
    from mixtune.engine.rundir import read_metrics
    from mixtune.errors import MixtuneError
    from mixtune.eval.constraints import domain_results, select_best_feasible

    records = read_metrics(run) if (run / "metrics.jsonl").is_file() else []
    names = [d.name for d in cfg.datasets]
    data = _json(run / "data.json").get("datasets", {})
    what = "LoRA adapter" if lora and not merged else "model"
    if lora and merged:
        what = "model (LoRA adapter merged into its base)"
    answer = answer_step(run)
    role = " — the run's answer (final/)" if answer == step else ""
    lines = [
        "---",
        *(
            ["library_name: peft", f"base_model: {base}"]
            if base
            else ["library_name: transformers"]
        ),
        "tags: [mixtune]",
        "---",
        f"# {run.name} at step {step}",
        "",
        f"A {what} fine-tuned with mixtune: run `{run}`, step {step} of "
        f"{_json(run / 'summary.json').get('steps', '?')}{role}. Weights from `{source}`.",
        f"Mixer `{cfg.mixer.name}`, loss `{cfg.loss.name}`, base model "
        f"`{cfg.model.name_or_path if cfg.model.config is None else 'model.config (random)'}`.",
        "",
        "```python",
        *(
            [
                "from peft import AutoPeftModelForCausalLM",
                "model = AutoPeftModelForCausalLM.from_pretrained(PATH)",
            ]
            if base
            else [
                "from transformers import AutoModelForCausalLM",
                "model = AutoModelForCausalLM.from_pretrained(PATH)",
            ]
        ),
        "```",
        "",
        "## Data mixture",
        "",
    ]
    mix = mixture(records, names, step)
    if mix["at"] is None:
        lines.append("Not trained: step 0 is the base model.")
    else:
        lines += [
            f"Weights are shares of the examples drawn; mean over steps 1-{step}.",
            "",
            "| dataset | source | examples | weight at this step | mean weight |",
            "|---|---|---|---|---|",
        ]
        for i, d in enumerate(cfg.datasets):
            n = data.get(d.name, {}).get("examples", "?")
            lines.append(
                f"| {d.name} | `{d.path}` | {n} | {mix['at'][i]:.3f} | {mix['mean'][i]:.3f} |"
            )
        lines += ["", "Weights over time (the steps where they changed):", ""]
        lines += ["| from step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        changes = mix["changes"]
        if len(changes) > 12:  # the first, the last and evenly between
            idx = sorted({round(i * (len(changes) - 1) / 11) for i in range(12)})
            changes = [changes[i] for i in idx]
        for s, w in changes:
            lines.append(f"| {s} | " + " | ".join(f"{x:.3f}" for x in w) + " |")
    lines += ["", "## Evaluation domains against their references", ""]
    evals = {r["step"]: r["eval"] for r in records if r.get("eval")}
    try:
        refs = select_best_feasible(records, cfg.evals)["references"]
    except MixtuneError:
        refs = {}
    if step not in evals:
        lines.append(f"Step {step} was not evaluated.")
    else:
        lines += [
            "| domain | role | metric | value | reference | slack | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for n, r in domain_results(evals[step], cfg.evals, refs).items():
            ref = "" if r["reference"] is None else f"{r['reference']:.4f}"
            slack = "" if r["slack"] is None else f"{r['slack']:+.4f}"
            verdict = "" if r["kept"] is None else ("kept" if r["kept"] else "broken")
            lines.append(
                f"| {n} | {r['role']} | {r['metric']} | {r['value']:.4f} | {ref} | {slack} "
                f"| {verdict} |"
            )
        lines += ["", "References are the config's, or the base model's value at step 0."]
    return "\n".join(lines) + "\n"


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
