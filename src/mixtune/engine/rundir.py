"""The run directory: config, the run's record, metrics.jsonl, data summary, checkpoints, logs.

``config.yaml`` is the config the run was started with and ``run.json`` its fingerprint
(:mod:`mixtune.engine.fingerprint`: the settings and the data the trajectory depends on), both
written at the first start and never rewritten by a resume. A resume that changes a setting it
may change appends one record per key to ``amendments.jsonl`` (``step``, ``key``, ``old``,
``new``); any other difference is refused.

Nothing is written here until the config, the data and the model have been validated and a
resume has been checked against the run's record (:meth:`RunDir.check_resume`), so a bad input
never touches an existing run's files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from mixtune import config as config_mod
from mixtune.engine import checkpoint, fingerprint, safewrite
from mixtune.errors import ConfigError, MixtuneError

FILES = ("config.yaml", "run.json", "metrics.jsonl", "summary.json", "data.json")
FILES += ("amendments.jsonl", "eval.json")
"""Entries of a run directory that are files ..."""
DIRS = ("checkpoints", "logs", "final", "final-last", "checkpoints/weights")
"""... and those that are directories (:meth:`RunDir.check_layout`)."""

WAYS_FORWARD = "resume with the settings and data it was started with, or use a new output_dir"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"
        self.logs = self.path / "logs"
        self.record = self.path / "run.json"
        self.amendments = self.path / "amendments.jsonl"

    def resume_point(self, resume: str) -> Path | None:
        """The checkpoint to continue from, per the ``resume`` setting (or None)."""
        if resume == "never":
            if checkpoint.complete(self.checkpoints):
                raise ConfigError(
                    f"resume=never but {self.path} already holds checkpoints; use a new "
                    "output_dir or resume=auto"
                )
            return None
        if resume == "auto":
            found = checkpoint.complete(self.checkpoints)
            if not found and checkpoint.listed(self.checkpoints):
                # Starting over would overwrite the run's history: its checkpoints are damaged
                # (each named in the log), not absent.
                raise ConfigError(
                    f"output_dir {self.path} holds checkpoints but none verifies (each is "
                    "named in the log above); restore one, or use a new output_dir"
                )
            return found[-1] if found else None
        p = Path(resume)
        if not (p / "state.json").is_file():
            raise ConfigError(f"resume: '{resume}' is not a complete checkpoint directory")
        return p

    def check_layout(self) -> None:
        """Refuse (:class:`ConfigError`) a run directory whose own entries are of the wrong kind
        (``metrics.jsonl`` a directory, ``checkpoints`` a file, ...): found before anything is
        written, instead of a failure in the middle of the run."""
        for name in FILES + DIRS:
            p = self.path / name
            if p.exists() or p.is_symlink():
                want = "a file" if name in FILES else "a directory"
                ok = p.is_file() if name in FILES else p.is_dir()
                if not ok:
                    raise ConfigError(
                        f"{p} should be {want} and is not; restore it (or move it away), or use "
                        "a new output_dir"
                    )

    def check_compatible(self, cfg: config_mod.RunConfig) -> None:
        """Refuse to resume a run whose datasets differ from this config's."""
        saved = self.path / "config.yaml"
        if not saved.is_file():
            return
        try:
            old = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", -1) + 1
            raise ConfigError(
                f"{saved} is not valid YAML (line {line}; edited by hand?); restore the config "
                "the run was started with, or use a new output_dir"
            ) from None
        if not isinstance(old, dict):
            raise ConfigError(f"{saved} is not a config (edited by hand?); restore it")
        old_names = [d.get("name") for d in old.get("datasets", [])]
        new_names = [d.name for d in cfg.datasets]
        if old_names != new_names:
            raise ConfigError(
                f"output_dir {self.path} holds a run over datasets {old_names}, not {new_names}; "
                "use a new output_dir or resume=never there"
            )

    def check_resume(
        self, cfg: config_mod.RunConfig, fp: dict, resume_from: Path | None
    ) -> list[fingerprint.Change]:
        """Refuse (:class:`ConfigError`, nothing written) a start that cannot honour what this
        directory records, or what the run that wrote ``resume_from`` records; ``fp`` is this
        start's fingerprint. Returns the changes the resume records as amendments."""
        self.check_layout()
        if (self.path / "summary.json").is_file() and not checkpoint.complete(self.checkpoints):
            raise ConfigError(
                f"output_dir {self.path} holds a finished run (summary.json) whose checkpoints "
                "are gone: it can be neither resumed nor extended, and is not overwritten; "
                "use a new output_dir"
            )
        if resume_from is None:
            return []
        self.check_compatible(cfg)
        step = int(json.loads((resume_from / "state.json").read_text())["step"])
        runs = [(self, f"output_dir {self.path}", WAYS_FORWARD)]
        source = resume_from.resolve().parent.parent
        if resume_from.resolve().parent.name == "checkpoints" and source != self.path.resolve():
            where = f"the run in {source} (resume={resume_from})"
            runs.append((RunDir(source), where, "continue it with those, or train without resume="))
        amended: list[fingerprint.Change] = []
        for run, where, forward in runs:
            known = run.recorded(step)
            if known is None:
                continue
            old, legacy = known
            new = fingerprint.of_settings(cfg) if legacy else fp
            refused, changes = fingerprint.compare(old, new, cfg, data_checked=not legacy)
            if refused:
                raise ConfigError(
                    f"{where} was started with other settings or data: "
                    f"{fingerprint.describe(refused, cfg=cfg)}; {forward}"
                )
            if run is self:
                amended = changes
        _check_sampler(resume_from, fp)
        if self.metrics.is_file():
            _records(self.metrics)  # only a last line cut short may be dropped
        return amended

    def recorded(self, step: int) -> tuple[dict, bool] | None:
        """``(fingerprint, legacy)`` of the run here as of ``step``: ``run.json`` with the
        amendments made up to ``step``; for a run started before ``run.json`` existed, the
        settings of its ``config.yaml`` (``legacy``). None when neither is readable."""
        if self.record.is_file():
            try:
                fp = dict(json.loads(self.record.read_text())["fingerprint"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(
                    f"{self.record} is not a run record; restore it, or use a new output_dir"
                ) from None
            for a in self._amendments():
                if a["step"] <= step:
                    fp[a["key"]] = a["new"]
            return {k: v for k, v in fp.items() if v != fingerprint.ABSENT}, False
        saved = self.path / "config.yaml"
        try:
            return fingerprint.of_settings(config_mod.load(saved)), True
        except (MixtuneError, OSError):  # none, or not a config this version reads
            return None

    def start(
        self,
        cfg: config_mod.RunConfig,
        resume_step: int | None,
        fp: dict | None = None,
        amendments: Sequence[fingerprint.Change] = (),
    ) -> None:
        """Create the directory and record the run (a first start: ``config.yaml`` and
        ``run.json``; a resume: its amendments), and cut metrics back to the resume point."""
        with safewrite.writing("the run's record (config.yaml, run.json)", self.path, self.path):
            self._record(cfg, resume_step, fp, amendments)

    def _record(self, cfg, resume_step, fp, amendments) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        saved = self.path / "config.yaml"
        if resume_step is None or not saved.is_file():  # (or continued from another run)
            config_mod.save(cfg, saved)
        if fp is not None and (resume_step is None or not self.record.is_file()):
            since = {} if resume_step is None else {"since_step": resume_step}
            self.write_json("run.json", {"fingerprint": fp, **since})
        if resume_step is None:
            self.amendments.unlink(missing_ok=True)
            self.metrics.write_text("")
            return
        # Amendments and records after the checkpoint belong to steps the resumed run replays.
        before = self._amendments()
        kept = [a for a in before if a["step"] <= resume_step]
        kept += [{"step": resume_step, **c._asdict()} for c in amendments]
        if kept != before:
            _atomic_write(self.amendments, "".join(json.dumps(a) + "\n" for a in kept))
        if self.metrics.is_file():
            keep = [ln for ln, rec in _records(self.metrics) if rec.get("step", 0) <= resume_step]
            _atomic_write(self.metrics, "".join(ln + "\n" for ln in keep))

    def adopt(self, ckpt: Path, step: int) -> bool:
        """Branching: continuing checkpoint ``ckpt`` of another run into this directory, which
        holds no metrics yet. Copies that run's ``metrics.jsonl`` records up to ``step``, so this
        run's metrics start where the source stopped and its evaluations (step 0 included) are
        there for the report. True when this was a branch; the fingerprint checks of both runs
        were done by :meth:`check_resume`."""
        ckpt = Path(ckpt).resolve()
        source = ckpt.parent.parent
        if ckpt.parent.name != "checkpoints" or source == self.path.resolve():
            return False
        if self.metrics.is_file():  # this directory's own run, resumed from a foreign checkpoint
            return False
        self.path.mkdir(parents=True, exist_ok=True)
        lines = []
        if (source / "metrics.jsonl").is_file():
            lines = [ln for ln, rec in _records(source / "metrics.jsonl") if rec["step"] <= step]
        _atomic_write(self.metrics, "".join(ln + "\n" for ln in lines))
        return True

    def append_metrics(self, record: dict) -> None:
        """Append one record; a write the disk refuses is cut back off (no partial line) and
        said in one line (:mod:`~mixtune.engine.safewrite`)."""
        data = memoryview((json.dumps(jsonable(record)) + "\n").encode())
        # Unbuffered: a refused write surfaces here, and the cut-back needs no flush first.
        with (
            safewrite.writing("metrics.jsonl", self.path, self.path),
            open(self.metrics, "ab", buffering=0) as f,
        ):
            size = os.fstat(f.fileno()).st_size
            try:
                while data:
                    data = data[f.write(data) :]
            except OSError:
                with contextlib.suppress(OSError):
                    f.truncate(size)
                raise

    def write_json(self, name: str, data) -> None:
        """Write ``name`` (whole or not at all)."""
        with safewrite.writing(name, self.path, self.path):
            _atomic_write(self.path / name, json.dumps(jsonable(data), indent=1))

    def _amendments(self) -> list[dict]:
        if not self.amendments.is_file():
            return []
        return [rec for _, rec in _records(self.amendments)]


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (a last line cut short by a crash is skipped)."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return [rec for _, rec in _records(p)]


def _records(path: Path) -> list[tuple[str, dict]]:
    """``(line, record)`` for each record of a JSON-lines file. The last line, when it has no
    newline and is not JSON, is an append cut short by a crash and is dropped; any other line
    that is not a JSON object is an error naming it."""
    lines = path.read_text(errors="replace").split("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = _parse(line)
        if rec is not None:
            out.append((line, rec))
        elif i < len(lines):
            raise ConfigError(
                f"{path}:{i}: not a JSON record (only a last line cut short by a crash is "
                "skipped); repair or delete that line"
            )
    return out


def _check_sampler(ckpt: Path, fp: dict) -> None:
    """The checkpoint's sampler must be over the datasets, and sizes, this start has."""
    path = ckpt / "sampler.json"
    if not path.is_file():
        return
    state = json.loads(path.read_text())
    names = fp["datasets"]
    sizes = [fp[f"datasets.{n}.examples"] for n in names]
    if state.get("names") != names or state.get("sizes") != sizes:
        raise ConfigError(
            f"checkpoint {ckpt} was trained on datasets {state.get('names')} of sizes "
            f"{state.get('sizes')}, not {names} of sizes {sizes}; {WAYS_FORWARD}"
        )


def _parse(line: str) -> dict | None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


_atomic_write = safewrite.atomic_text


def jsonable(x):
    """``x`` as plain JSON data (arrays as lists, non-finite floats as null)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
