"""Run a task sequence stage by stage with the ordinary training loop.

Stage s trains on [current task, buffers of tasks < s, (safety buffer)] from the previous
stage's ``final/`` model (``model.name_or_path`` = that directory). The optimizer state and LR
schedule restart at each stage (each stage is its own run). During a stage, evaluation domains
report losses only (the mixer reads them at its decisions); after the stage the driver evaluates
every task seen so far and the safety domain with accuracy. A finished stage leaves
``stage.json``; a rerun skips it, and an interrupted stage resumes from its checkpoint.

Any mixer runs; one that declares :class:`~mixtune.continual.hooks.StageAware` is told its
stage before training and hands back, after the final evaluation, the state the next stage
starts from (``carry``) and its decisions (``trajectory``), both kept in ``stage.json``.

Outputs in the sequence directory: ``results.json`` (matrices, average accuracy, forgetting,
safety, vulnerability, cost), ``results.md`` and ``results.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from mixtune import config as C
from mixtune.config import MethodConfig, RunConfig, TrainConfig
from mixtune.continual.config import ContinualConfig
from mixtune.continual.hooks import StageContext, StageEnd, stage_hooks
from mixtune.continual.metrics import summarize, write_outputs
from mixtune.continual.stages import SAFETY_BUFFER, SAFETY_EVAL, stage_config

log = logging.getLogger(__name__)


def warmup(cc: ContinualConfig, default_dir: str | Path) -> str | None:
    """The model every sequence starts from: the cached warm-up run's ``final/`` (or None)."""
    w = cc.warmup
    if w is None:
        return None
    from mixtune.engine.loop import Trainer

    wdir = Path(w.output_dir or default_dir)
    if not (wdir / "summary.json").is_file():
        train = C.build(TrainConfig, {**C.to_dict(cc.train), **(w.train or {})}, "warmup.train")
        cfg = RunConfig(
            output_dir=str(wdir),
            seed=cc.seed,
            max_steps=w.steps,
            model=cc.model,
            datasets=w.datasets,  # the run config's default mixer
            loss=cc.loss,
            train=dataclasses.replace(train, eval_every=0),
            progress=cc.progress,
        )
        log.info("warm-up: %d steps on %s", w.steps, [d.name for d in w.datasets])
        Trainer(cfg).run()
        shutil.rmtree(wdir / "checkpoints", ignore_errors=True)
    return str(wdir / "final")


def run_sequence(
    cc: ContinualConfig,
    order: Sequence[str],
    out_dir: str | Path,
    mixer: MethodConfig | None = None,
    seed: int | None = None,
    steps: int | None = None,
    start_model: str | None = None,
) -> dict:
    """Train the tasks of ``order`` one after another; returns (and writes) the results.

    The returned dict also holds ``records``: each stage's ``stage.json`` (evaluation, weights,
    cost, and the mixer's trajectory and carried state).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mixer = mixer or cc.mixer
    records, carry = [], {}
    model = start_model
    for s, task in enumerate(order):
        sdir = out / f"stage-{s + 1:02d}-{task}"
        done = sdir / "stage.json"
        if done.is_file():
            rec = json.loads(done.read_text())
        else:
            rec = _run_stage(cc, list(order), s, sdir, mixer, carry, model, seed, steps)
            _write_json(done, rec)
            if not cc.keep_checkpoints:
                shutil.rmtree(sdir / "checkpoints", ignore_errors=True)
        records.append(rec)
        carry, model = rec["carry"], str(sdir / "final")
    result = summarize(list(order), records, safety=cc.safety_eval is not None)
    result["mixer"] = {"name": mixer.name, **{k: v for k, v in mixer.params.items()}}
    write_outputs(out, result)
    return {**result, "records": records}  # the stage records (trajectories) are not written


def _run_stage(
    cc: ContinualConfig,
    order: list[str],
    s: int,
    sdir: Path,
    mixer: MethodConfig,
    carry: dict,
    model: str | None,
    seed: int | None,
    steps: int | None,
) -> dict:
    from mixtune.engine.loop import Trainer

    t0 = time.perf_counter()
    task = order[s]
    cfg = stage_config(
        cc, order, s, mixer, model_path=model, output_dir=str(sdir), max_steps=steps, seed=seed
    )
    # Losses only while training (the mixer's probes); accuracy once, at the end of the stage.
    want = {e.name: e.accuracy if cc.accuracy else False for e in cfg.evals}
    cfg = dataclasses.replace(
        cfg, evals=tuple(dataclasses.replace(e, accuracy=False) for e in cfg.evals)
    )
    trainer = Trainer(cfg)
    hooks = stage_hooks(trainer.mixer)
    hooks.begin_stage(
        StageContext(
            current=task,
            index=s,
            n_stages=len(order),
            learned={order[i]: i for i in range(s)},
            safety_buffer=SAFETY_BUFFER if cc.safety_buffer else None,
            safety_domain=SAFETY_EVAL,
            carry=carry,
        )
    )
    start = _evaluate(trainer, want) if s == 0 else None  # the model before any training
    summary = trainer.run()
    ev = _evaluate(trainer, want)
    outcome = hooks.end_stage(
        StageEnd(
            max_steps=cfg.max_steps,
            losses={k: m["loss"] for k, m in ev.items()},
            evaluate=partial(_losses, trainer),
        )
    )
    from mixtune.engine.rundir import read_metrics

    weights = [
        {"step": r["step"], **r["weights"]}
        for r in read_metrics(sdir)
        if "mixer" in r or r["step"] == 0
    ]
    n_params = sum(p.numel() for p in trainer.model.parameters())
    return {
        "stage": s,
        "task": task,
        "eval": ev,
        "start_eval": start,
        "weights": weights,
        "trajectory": outcome.trajectory,
        "carry": outcome.carry,
        "steps": summary["steps"],
        "seconds": round(time.perf_counter() - t0, 3),
        "train_seconds": summary["seconds"],
        "input_tokens": summary["input_tokens"],
        "params": n_params,
        "train_flops": 6.0 * n_params * summary["input_tokens"],
    }


def _evaluate(trainer, want: dict) -> dict:
    """Loss of every domain, and accuracy where the task's eval asks for it (or has answers)."""
    for d in trainer.domains:
        has = bool(len(d.data)) and all(a is not None for a in d.data.answers)
        d.accuracy = has and want.get(d.name) is not False
    try:
        return trainer.evaluate(use_cache=False)
    finally:
        for d in trainer.domains:
            d.accuracy = False


def _losses(trainer, n_batches: int) -> dict[str, float]:
    """Every domain's loss over its first ``n_batches`` batches, evaluated afresh."""
    ev = trainer.evaluate(n_batches=n_batches, accuracy=False, use_cache=False)
    return {k: m["loss"] for k, m in ev.items()}


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
