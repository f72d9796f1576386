"""The run directory: resolved config, metrics.jsonl, data summary, checkpoints, logs.

Nothing is written here until the config, the data and the model have been validated, so a bad
input never touches an existing run's files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import yaml

from mixtune import config as config_mod
from mixtune.engine import checkpoint
from mixtune.errors import ConfigError


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"
        self.logs = self.path / "logs"

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
            return found[-1] if found else None
        p = Path(resume)
        if not (p / "state.json").is_file():
            raise ConfigError(f"resume: '{resume}' is not a complete checkpoint directory")
        return p

    def check_compatible(self, cfg: config_mod.RunConfig) -> None:
        """Refuse to resume a run whose datasets differ from this config's."""
        saved = self.path / "config.yaml"
        if not saved.is_file():
            return
        old = yaml.safe_load(saved.read_text()) or {}
        old_names = [d.get("name") for d in old.get("datasets", [])]
        new_names = [d.name for d in cfg.datasets]
        if old_names != new_names:
            raise ConfigError(
                f"output_dir {self.path} holds a run over datasets {old_names}, not {new_names}; "
                "use a new output_dir or resume=never there"
            )

    def start(self, cfg: config_mod.RunConfig, resume_step: int | None) -> None:
        """Create the directory, save the config, and cut metrics back to the resume point."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        config_mod.save(cfg, self.path / "config.yaml")
        if resume_step is None:
            self.metrics.write_text("")
        elif self.metrics.is_file():
            # Records after the checkpoint are replayed by the resumed run; a record cut short
            # by a crash mid-append is dropped.
            keep = [
                ln
                for ln in self.metrics.read_text().splitlines()
                if (rec := _parse(ln)) is not None and rec.get("step", 0) <= resume_step
            ]
            _atomic_write(self.metrics, "".join(ln + "\n" for ln in keep))

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def write_json(self, name: str, data) -> None:
        _atomic_write(self.path / name, json.dumps(_jsonable(data), indent=1))


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


def _parse(line: str) -> dict | None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
