"""The example configs, shipped in the package so that a pip install has them too.

The repository's top-level ``configs/`` is the source the README points at; this folder holds
the same files (``tests/test_config_hygiene.py`` checks that they are identical), because a
wheel only carries files inside the package. ``mixtune configs`` lists them and copies one out;
``mixtune train configs/static.yaml`` run outside the repository reads the shipped copy
(:func:`shipped_copy`, used by :func:`mixtune.rawconfig.read_yaml`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from mixtune.errors import ConfigError

DIR = Path(__file__).parent


def examples() -> dict[str, Path]:
    """Every shipped example by name: the path below this folder without ``.yaml``
    (``static``, ``accelerate/fsdp``), in name order."""
    found = {p.relative_to(DIR).with_suffix("").as_posix(): p for p in DIR.rglob("*.yaml")}
    return dict(sorted(found.items()))


def describe(path: Path, width: int = 100) -> str:
    """One line about an example: the first sentence of its leading comment (the lines before
    its first indented usage line), cut to ``width`` characters."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or line.startswith("#  ") or not line[1:].strip():
            break
        words.append(line[1:].strip())
    text = " ".join(words)
    end = re.search(r"(?<!et al)\.(\s|$)", text)
    text = text[: end.start() + 1] if end else text
    return text if len(text) <= width else text[: width - 3] + "..."


def shipped_copy(path: Path) -> Path | None:
    """The shipped example a missing relative ``configs/<name>.yaml`` path means, or None (the
    path exists, or names no shipped example)."""
    parts = path.parts
    if path.exists() or path.is_absolute() or len(parts) < 2 or parts[0] != "configs":
        return None
    candidate = DIR.joinpath(*parts[1:])
    return candidate if candidate.suffix == ".yaml" and candidate.is_file() else None


def copy_out(name: str, dest: str | Path | None = None) -> Path:
    """Copy the example ``name`` (``static``, ``static.yaml`` or ``configs/static.yaml``) to
    ``dest`` (a file path, or an existing directory; default: ``<name>.yaml`` here); returns the
    path written. An existing file is never overwritten."""
    key = name.removeprefix("configs/").removesuffix(".yaml")
    known = examples()
    if key not in known:
        raise ConfigError(f"no shipped example config '{name}'; examples are {list(known)}")
    target = Path(dest) if dest is not None else Path(Path(key).name + ".yaml")
    if target.is_dir():
        target = target / known[key].name
    if target.exists():
        raise ConfigError(f"{target} already exists; give another destination or remove it")
    if not target.parent.is_dir():
        raise ConfigError(f"{target.parent} is not a directory")
    shutil.copyfile(known[key], target)
    return target
