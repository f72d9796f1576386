"""Stage expansion: one ordinary run config per stage of a task sequence.

Stage s (0-based) of a sequence trains on the current task, a buffer (a seeded subset of
``buffer_size`` training examples) of every earlier task and the optional always-available
safety buffer, and evaluates every task seen so far plus the safety domain. Future tasks never
appear in a stage's config, which is what "masked" means here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from mixtune import config as C
from mixtune.config import DatasetConfig, EvalConfig, MethodConfig, RunConfig

if TYPE_CHECKING:
    from mixtune.continual.config import ContinualConfig, TaskConfig

SAFETY_EVAL = "safety"
"""The safety evaluation domain of every stage (when the config has ``safety_eval``)."""
SAFETY_BUFFER = "safety_replay"
"""The safety buffer's dataset in every stage (when the config has ``safety_buffer``)."""


def stage_config(
    cc: ContinualConfig,
    order,
    s: int,
    mixer: MethodConfig,
    model_path: str | None = None,
    output_dir: str | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
) -> RunConfig:
    """The ordinary run config of stage ``s`` (0-based) of the sequence ``order``."""
    tasks = [cc.task(n) for n in order]
    cur = tasks[s]
    datasets = [_dataset(cur, cur.max_examples)]
    datasets += [_dataset(t, cc.buffer_size) for t in tasks[:s]]
    evals = [_eval(cc, t) for t in tasks[: s + 1]]
    if cc.safety_buffer is not None:
        datasets.append(
            C.build(DatasetConfig, {"name": SAFETY_BUFFER, **cc.safety_buffer}, "safety_buffer")
        )
    if cc.safety_eval is not None:
        spec = {
            "batches": cc.eval_batches,
            "batch_size": cc.eval_batch_size,
            "max_new_tokens": cc.max_new_tokens,
            "role": "constraint",
            **cc.safety_eval,
            "name": SAFETY_EVAL,
        }
        evals.append(C.build(EvalConfig, spec, "safety_eval"))
    model = cc.model
    if model_path is not None:  # later stages start from the previous stage's final model
        model = dataclasses.replace(
            model,
            name_or_path=model_path,
            config=None,
            tokenizer=model.tokenizer or cc.model.name_or_path,
        )
    out = output_dir or str(Path(cc.output_dir) / f"stage-{s + 1:02d}-{cur.name}")
    cfg = RunConfig(
        output_dir=out,
        seed=cc.seed if seed is None else seed,
        max_steps=max_steps or cur.steps or cc.steps_per_stage,
        resume="auto",
        model=model,
        datasets=tuple(datasets),
        evals=tuple(evals),
        mixer=mixer,
        loss=cc.loss,
        # The next stage continues from this one's last model (its evaluation is the stage's
        # result), not from a best feasible step (engine/answer.py).
        train=dataclasses.replace(cc.train, final_model="last"),
        progress=cc.progress,
    )
    C._validate_methods(cfg)
    return cfg


def _dataset(t: TaskConfig, limit: int | None) -> DatasetConfig:
    return DatasetConfig(
        name=t.name,
        path=t.path,
        split=t.split,
        subset=t.subset,
        format=t.format,
        fields=t.fields,
        max_examples=limit,
    )


def _eval(cc: ContinualConfig, t: TaskConfig) -> EvalConfig:
    if t.eval is not None:
        spec = dict(t.eval)
    elif t.path.startswith("builtin:"):
        spec = {"path": t.path, "split": "eval"}
    else:
        spec = {"from_dataset": t.name, "holdout": 0.1}
    spec = {
        "batches": cc.eval_batches,
        "batch_size": cc.eval_batch_size,
        "max_new_tokens": cc.max_new_tokens,
        "role": "target",
        **spec,
        "name": t.name,
    }
    return C.build(EvalConfig, spec, f"stages.{t.name}.eval")
