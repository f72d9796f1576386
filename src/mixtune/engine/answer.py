"""The run's answer: which model a run with target or constraint domains hands back.

DynaMiCS's output (Gualdoni et al. 2026) is not the last step but the best feasible evaluated
step, or the base model when no step was feasible (the rule:
:func:`mixtune.eval.constraints.select_best_feasible`). Which step wins is known only at the
end, so the weights of whichever step can still win must be on disk by then:

1. **Weights-only copies.** At every scheduled evaluation the rule is applied to the
   evaluations so far. When this step is the best so far (step 0, the base model, until a step
   is feasible), its trainable tensors are written to
   ``checkpoints/weights/step-NNNNNN/trainable.safetensors`` with a manifest: no optimizer
   state, so for LoRA a few MB. Checkpoint rotation never looks there. A copy a later step
   supersedes is deleted once no kept checkpoint needs it (each checkpoint records the best
   step as of its own step, so resuming from it finds that copy). The last step is copied too
   when it is the best: a run continued past it (a higher ``max_steps``) may still choose it
   after its full checkpoint is rotated away.
2. **final/** (``train.final_model``): ``best_feasible`` (default) holds the chosen step's
   model, or the base model when none was feasible (a WARNING says so); ``last`` holds the last
   step's. When ``final/`` is not the last step's model, that one is saved beside it in
   ``final-last/``. ``final/selection.json`` names the rule, the step (null: the base model),
   where the weights came from and every domain's value against its reference; it agrees with
   ``summary.json``'s ``best_feasible`` (one computation feeds both).
3. **The verdict** is logged on rank 0: each constraint kept or broken and by how much, the
   chosen step, and the path of the model to use.

``final/`` is written from the state dict of the model in memory with the chosen step's
tensors substituted (tied parameters follow), so it is bit for bit that step's weights.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import save_file

from mixtune.engine import build, checkpoint, safewrite
from mixtune.engine.integrity import fsync, problem, read, write_manifest
from mixtune.engine.rundir import RunDir, jsonable, read_metrics
from mixtune.engine.safewrite import atomic_dir, discard
from mixtune.errors import MixtuneError
from mixtune.eval.constraints import domain_results, select_best_feasible

log = logging.getLogger(__name__)

WEIGHTS = "weights"
"""``checkpoints/weights/``: the weights-only copies of evaluated steps."""


def weights_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / WEIGHTS


def step_dir(root: Path, step: int) -> Path:
    return root / f"{checkpoint.PREFIX}{step:06d}"


def weights_dir(run_dir: Path, step: int) -> Path | None:
    """Where the trainable weights of evaluated step ``step`` of a run are kept: its full
    checkpoint or its weights-only copy (None if neither is)."""
    for root in (Path(run_dir) / "checkpoints", weights_root(run_dir)):
        d = step_dir(root, step)
        if (d / "trainable.safetensors").is_file():
            return d
    return None


def kept_steps(run_dir: Path) -> list[int]:
    """The steps of a run whose weights are kept (full checkpoints and weights-only copies)."""
    found = set()
    for root in (Path(run_dir) / "checkpoints", weights_root(run_dir)):
        if root.is_dir():
            for d in root.glob(f"{checkpoint.PREFIX}*"):
                if (
                    d.name[len(checkpoint.PREFIX) :].isdigit()
                    and (d / "trainable.safetensors").is_file()
                ):
                    found.add(int(d.name[len(checkpoint.PREFIX) :]))
    return sorted(found)


class Answer:
    """Tracks the evaluations of a run, keeps the weights the answer may need, writes final/.

    Args:
        rundir: the run directory.
        domains: the selection domains (``DomainInfo``; test twins excluded).
        all_domains: every evaluation domain (test twins too), for selection.json.
        rule: ``train.final_model``.
        acc: the accelerator (rank 0 writes).
    """

    def __init__(
        self,
        rundir: RunDir,
        domains: Sequence,
        all_domains: Sequence,
        rule: str,
        acc,
        keep_all: bool = False,
    ):
        self.rundir, self.domains, self.all_domains = rundir, list(domains), list(all_domains)
        self.rule, self.acc, self.keep_all = rule, acc, keep_all
        self.active = any(d.role in ("target", "constraint") for d in self.domains)
        self.evals: dict[int, dict] = {}  # step -> eval section of its metrics record
        self.best: int | None = None  # the best step so far (0: the base model)
        self.root = weights_root(rundir.path)

    # -- during the run ------------------------------------------------------------------------
    def observe(self, step: int, result: dict, model) -> None:
        """After the scheduled evaluation ``result`` of ``step`` (every rank calls this: with
        FSDP2 the copy is a gather). Keeps a weights-only copy when this step is the best so
        far (every evaluated step with ``train.keep_evaluated: all``)."""
        if self.keep_all:
            self._write(step, model)
        if not self.active:
            return
        self.evals[step] = result
        best = self._select()
        if best is None or best["step"] == self.best:
            return
        self.best = best["step"]
        if self.best == step and not self.keep_all:
            self._write(step, model)

    def _select(self) -> dict | None:
        records = [{"step": s, "eval": e} for s, e in sorted(self.evals.items())]
        try:
            return select_best_feasible(records, self.domains)
        except MixtuneError:  # no step-0 evaluation (a run resumed from an old checkpoint)
            return None

    def _write(self, step: int, model) -> None:
        tensors = checkpoint.trainable_tensors(
            self.acc.unwrap_model(model), keep=self.acc.is_main_process
        )
        if not self.acc.is_main_process:
            return
        final = step_dir(self.root, step)
        what = f"the weights-only copy of step {step}"
        # Whole or absent: a reader (mixtune eval / export) never sees it half-written; the same
        # step again (a resumed run replays it) replaces it in one rename.
        with safewrite.writing(what, self.root, self.rundir.path), atomic_dir(final) as tmp:
            save_file(tensors, str(tmp / "trainable.safetensors"))
            fsync(tmp / "trainable.safetensors")
            write_manifest(tmp)
        fsync(self.root)

    def prune(self) -> None:
        """Delete the copies that neither the best so far nor a kept checkpoint needs (rank
        0, after each checkpoint save)."""
        if not self.active or not self.root.is_dir() or self.keep_all:
            return
        needed = {self.best}
        for ckpt in checkpoint.listed(self.rundir.checkpoints):
            try:
                needed.add(json.loads((ckpt / "state.json").read_text())["answer"]["best"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        for d in self.root.glob(f"{checkpoint.PREFIX}*"):
            step = d.name[len(checkpoint.PREFIX) :]
            if step.isdigit() and int(step) not in needed:
                discard(d)  # renamed away first: a reader finds it whole or gone
        for d in self.root.glob(".tmp-*"):  # left by a crash mid-copy
            shutil.rmtree(d, ignore_errors=True)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"answer": {"evals": self.evals, "best": self.best}} if self.active else {}

    def load_state_dict(self, state: dict, step: int, source_run: Path) -> None:
        """Restore from a checkpoint's state; one written before this existed is rebuilt from
        the metrics of the run it came from (its evaluations up to ``step``)."""
        if not self.active:
            return
        saved = state.get("answer")
        if saved is not None:
            self.evals = {int(s): e for s, e in saved["evals"].items()}
            self.best = saved["best"]
            return
        try:
            records = read_metrics(source_run)
        except (OSError, MixtuneError):
            records = []
        for r in records:
            if r.get("eval") and r["step"] <= step:
                self.evals[r["step"]] = r["eval"]
        best = self._select()
        self.best = None if best is None else best["step"]

    def adopt(self, source_run: Path) -> None:
        """Branching (rank 0): copy the weights-only copy of the best step so far from the run
        the resumed checkpoint belongs to, so this run can still choose it."""
        if not self.active or self.best is None:
            return
        src = step_dir(weights_root(source_run), self.best)
        dst = step_dir(self.root, self.best)
        if src.is_dir() and not dst.exists():
            what = f"the weights-only copy of step {self.best}"
            with safewrite.writing(what, self.root, self.rundir.path), atomic_dir(dst) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)

    # -- at the end ----------------------------------------------------------------------------
    def finish(self, model, tokenizer, full: dict | None, last_step: int, base: str | None):
        """Write ``final/`` (and ``final-last/``, ``selection.json``) and log the verdict
        (rank 0). Returns ``(best_feasible, selection)`` for ``summary.json``, both None for a
        run without target or constraint domains."""
        out = self.rundir.path / "final"
        beside = self.rundir.path / "final-last"
        # final/ and final-last/ are written beside and renamed into place (safewrite): a full
        # disk, a crash or a signal leaves the previous ones (or none), never half a model.
        with safewrite.writing("the final model (final/)", out, self.rundir.path):
            return self._finish(out, beside, model, tokenizer, full, last_step, base)

    def _finish(self, out, beside, model, tokenizer, full, last_step, base):
        best = self._select() if self.active else None
        if best is None:
            if self.active:
                log.warning(
                    "no step-0 evaluation in this run's record: final/ holds the last step's "
                    "model, no best feasible step was selected"
                )
            with atomic_dir(out) as tmp:
                build.save_final(model, tokenizer, tmp, full, base)
            discard(beside)
            return ({"error": "no step-0 evaluation"} if self.active else None), None
        chosen = None if best["keep_base_model"] else best["step"]
        use = last_step if self.rule == "last" else (0 if chosen is None else chosen)
        kept = None if use == last_step else weights_dir(self.rundir.path, use)
        bad = "not kept" if kept is None else problem(kept)
        if use != last_step and bad is not None:
            log.warning(
                "the weights of step %d are unusable (%s; a run resumed from a checkpoint "
                "older than weights-only copies?): final/ holds the last step's model",
                use,
                bad,
            )
            use, kept = last_step, None
        if self.rule == "last" or use == last_step:
            source = "last"
        else:
            source = "base" if chosen is None else "checkpoint"
        found = weights_dir(self.rundir.path, best["step"]) if best["feasible"] else None
        best["checkpoint"] = None if found is None else str(found)
        evaluated = use if use in self.evals else max(self.evals)  # (a run stopped early)
        selection = {
            "rule": self.rule,
            "step": None if (source == "base") else use,
            "source": source,
            "last_step": last_step,
            "best_feasible_step": chosen,
            "evaluated_step": evaluated,  # the evaluation "domains" come from
            "domains": domain_results(self.evals[evaluated], self.all_domains, best["references"]),
            "path": str(out),
            "last_path": str(beside) if use != last_step else str(out),
        }
        sd = full
        if use != last_step:
            with atomic_dir(beside) as tmp:
                build.save_final(model, tokenizer, tmp, full, base)
            tensors = read(kept, "trainable.safetensors", "safetensors")
            sd = _substituted(self.acc.unwrap_model(model), full, tensors)
        with atomic_dir(out) as tmp:
            build.save_final(model, tokenizer, tmp, sd, base)
            safewrite.atomic_text(tmp / "selection.json", json.dumps(jsonable(selection), indent=1))
        if use == last_step:
            discard(beside)
        last_eval = self.evals.get(last_step)
        at_last = (
            None
            if last_eval is None or use == last_step
            else domain_results(last_eval, self.all_domains, best["references"])
        )
        _say(selection, best, at_last)
        return best, selection


def _substituted(model, full: dict | None, tensors: dict) -> dict:
    """The model's whole state dict with ``tensors`` (trainable, by parameter name) in place
    of the live values; a key that shares a parameter's storage (tied embeddings) follows it."""
    if full is not None:  # FSDP2: the gathered full state dict, keyed like the parameters
        return {**full, **tensors}
    sd = dict(model.state_dict())
    owners: dict[int, list[str]] = {}
    for k, v in sd.items():
        if v.numel():
            owners.setdefault(v.data_ptr(), []).append(k)
    for name, p in build.trainable(model):
        for k in owners.get(p.data_ptr(), [name]) if p.numel() else [name]:
            sd[k] = tensors[name]
    return sd


def _say(selection: dict, best: dict, at_last: dict | None) -> None:
    """The verdict, in the terminal (rank 0's log): the answer's step, each constraint there
    against its reference, and what the last step broke when the answer is another model."""
    cons = {n: r for n, r in selection["domains"].items() if r["role"] == "constraint"}
    targets = {n: r for n, r in selection["domains"].items() if r["role"] == "target"}
    step, last = selection["step"], selection["last_step"]
    if step is None:
        head = f"keep the BASE model: no evaluated step of {last} was feasible"
    else:
        held = sum(1 for r in cons.values() if r["kept"])
        head = f"step {step} of {last}; {held}/{len(cons)} constraints kept"
    lines = [f"answer ({selection['rule']}): {head}"]
    for n, r in targets.items():
        lines.append(f"  target     {n:<16} {r['metric']} {r['value']:.4f}")
    for n, r in cons.items():
        word = "kept" if r["kept"] else "BROKEN"
        lines.append(
            f"  constraint {n:<16} {r['metric']} {r['value']:.4f} vs reference "
            f"{r['reference']:.4f}: {word} (slack {r['slack']:+.4f})"
        )
    if best.get("feasible"):
        lines.append(f"  summed target loss {best['target_reduction']:.1%} below the base model's")
    if at_last is not None:
        broken = [f"{n} ({r['slack']:+.4f})" for n, r in at_last.items() if r["kept"] is False]
        lines.append(
            f"  the last step ({last}) broke "
            + (", ".join(broken) if broken else "no constraint")
            + " (slack in the domain's metric)"
        )
    lines.append(f"model to use: {selection['path']}")
    if selection["last_path"] != selection["path"]:
        lines.append(f"the last step's model: {selection['last_path']}")
    log.info("\n".join(lines))
    if best.get("keep_base_model") and selection["rule"] == "best_feasible":
        worst = best.get("least_violating") or {}
        log.warning(
            "no evaluated step kept every constraint while improving the targets: final/ holds "
            "the BASE model (step 0)%s",
            f"; the least violating step was {worst['step']} (excess {worst['max_excess']:.4f})"
            if worst
            else "",
        )
