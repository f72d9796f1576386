"""MergeMix's expensive half: domain experts, their cached task vectors, merged evaluations.

- :func:`expert_config`: the run config of expert k = the plan's run config with a one-hot
  ``fixed`` mixer on dataset k, a constant LR, no warm-up and a short budget (E1 of the paper:
  short horizon, constant LR, all experts from the same base).
- :func:`train_experts`: trains each expert as a normal run directory under
  ``<plan>/experts/<name>``. A finished expert (``final/`` and ``summary.json``) is skipped; a
  half-trained one continues from its latest checkpoint (``resume: auto``).
- :func:`build_task_vector`: τ_k = the expert's full delta, or the dense delta s·B·A of its
  LoRA adapter, written once as ``<plan>/task_vectors/<name>.safetensors`` (float32).
- :class:`MergedEvaluator`: θ(α) = base + Σ α_k τ_k (fp32, tensor by tensor from the cached
  files), loaded into one evaluation model, scored on the run's evaluation domains with
  ``eval.domains.evaluate``; scores are cached in ``<plan>/evals.jsonl`` keyed by the rounded α
  and a stamp of the task-vector files, so a resumed plan never re-evaluates a merge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from mixtune import config as config_mod
from mixtune.config import RunConfig
from mixtune.planners.mergemix import merge

log = logging.getLogger(__name__)


def eval_raw(run: RunConfig, accuracy: bool) -> list[dict]:
    """The run's eval sections, with generation switched off when no accuracy is needed."""
    evals = config_mod.to_dict(run.evals)
    if not accuracy:
        for e in evals:
            e.update(accuracy=False, metric="loss")
    return evals


def expert_config(
    run: RunConfig, k: int, steps: int, lr: float, out: Path, save_every: int, progress: bool
) -> RunConfig:
    """Expert k's run: one-hot ``fixed`` mixer, constant LR, no warm-up, ``steps`` steps.

    Its evaluation domains stay (holding out the same examples) but only score losses, at step
    0 and at the end: the merges are scored by the planner, not here.
    """
    raw = config_mod.to_dict(run)
    name = run.datasets[k].name
    raw.update(
        output_dir=str(out / "experts" / name),
        max_steps=steps,
        resume="auto",
        mixer={"name": "fixed", "weights": {name: 1.0}},
        report_to=[],
        progress=progress,
        evals=eval_raw(run, False),
    )
    raw["train"].update(
        lr=lr,
        schedule="constant",
        warmup_steps=0,
        warmup_ratio=0.0,
        eval_every=0,
        save_every=save_every,
        final_model="last",  # the task vector is the expert's last model (engine/answer.py)
    )
    return config_mod.from_dict(raw)


def expert_steps(run: RunConfig, info, steps: int | None, tokens: int | None) -> int:
    """Steps of one expert: given, or a token budget over the dataset's mean example length."""
    if tokens is not None:
        per_example = info.tokens / max(info.size, 1)
        return max(1, math.ceil(tokens / (run.train.batch_size * per_example)))
    return steps if steps is not None else max(1, run.max_steps // 4)


def finished(run_dir: Path) -> bool:
    return (run_dir / "final").is_dir() and (run_dir / "summary.json").is_file()


def train_experts(cfgs: list[RunConfig], progress: bool) -> list[dict]:
    """Train every expert that has not finished yet; returns their summaries."""
    from tqdm.auto import tqdm

    from mixtune.engine.loop import Trainer

    out = []
    bar = tqdm(cfgs, desc="experts", unit="expert", disable=not progress, dynamic_ncols=True)
    for cfg in bar:
        run_dir = Path(cfg.output_dir)
        bar.set_postfix_str(run_dir.name)
        if finished(run_dir):
            log.info("expert %s: already trained, skipped", run_dir.name)
        else:
            Trainer(cfg).run()
        out.append(json.loads((run_dir / "summary.json").read_text()))
    return out


def build_task_vector(run_dir: Path, base: dict, path: Path, lora: bool) -> None:
    """Write τ of the expert in ``run_dir`` to ``path`` unless a newer copy is there."""
    summary = run_dir / "summary.json"
    if path.is_file() and path.stat().st_mtime_ns >= summary.stat().st_mtime_ns:
        return
    if lora:
        tv = merge.adapter_task_vector(run_dir / "final", base)
    else:
        from transformers import AutoModelForCausalLM

        expert = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32)
        sd = expert.state_dict()
        tv = merge.task_vector(base, {k: sd[k] for k in base})
        del expert, sd
    merge.save_task_vector(tv, path)


def files_stamp(paths: list[Path]) -> str:
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def alpha_key(alpha) -> str:
    return ",".join(f"{x:.6f}" for x in np.asarray(alpha, np.float64))


class MergedEvaluator:
    """Scores θ_base + Σ α_k τ_k on the evaluation domains (cached on disk)."""

    def __init__(
        self,
        trainer,
        base: dict,
        tv_paths: list[Path],
        cache: Path,
        n_batches: int | None,
        accuracy: bool,
    ):
        self.t, self.base, self.paths, self.cache = trainer, base, tv_paths, cache
        self.n_batches, self.accuracy = n_batches, accuracy
        self.module = trainer.acc.unwrap_model(trainer.model)
        self.stamp = f"{files_stamp(tv_paths)}:{n_batches}"
        self.n_evals, self.seconds, self.used = 0, 0.0, set()
        self.known: dict[str, dict] = {}
        if cache.is_file():
            for line in cache.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("stamp") == self.stamp:
                        self.known[rec["key"]] = rec

    def _cached(self, key: str, make) -> dict:
        """Scores of the merge ``key`` (from the cache when it holds every needed metric).

        ``n_evals``/``seconds`` count every distinct merge used, cached or not, with the
        evaluation time recorded when it was first measured.
        """
        from mixtune.eval.domains import evaluate

        rec = self.known.get(key)
        if rec is None or not all(
            d.name in rec["scores"]
            and ("accuracy" in rec["scores"][d.name] or not (self.accuracy and d.accuracy))
            for d in self.t.domains
        ):
            t0 = time.perf_counter()
            self.module.load_state_dict(make())
            scores = evaluate(
                self.t.model,
                self.t.acc,
                self.t.domains,
                self.t.tokenizer,
                self.n_batches,
                self.accuracy,
            )
            rec = {
                "key": key,
                "stamp": self.stamp,
                "scores": scores,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            self.known[key] = rec
            with open(self.cache, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if key not in self.used:
            self.used.add(key)
            self.n_evals += 1
            self.seconds += rec.get("seconds", 0.0)
        return rec["scores"]

    def __call__(self, alpha, source: str = "") -> dict:
        alpha = [float(a) for a in alpha]
        return self._cached(
            alpha_key(alpha), lambda: merge.task_arithmetic_files(self.base, self.paths, alpha)
        )

    def base_scores(self) -> dict:
        return self._cached("base", lambda: self.base)

    def restore(self) -> None:
        self.module.load_state_dict(self.base)
