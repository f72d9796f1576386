"""The raw config mapping, before it is typed: a YAML file read safely, dotted overrides.

``read_yaml(path)`` loads a config file's top-level mapping (refusing a key written twice in one
mapping, :class:`ConfigLoader`, and YAML aliases that expand to something huge or
self-containing, :func:`check_expanded_size`; a ``configs/<name>.yaml`` that is not there is
read from the examples shipped in the package, :mod:`mixtune.configs`); ``apply_override(raw,
"train.lr=5e-5")`` sets one dotted key in it (list entries by index or by ``name``).
:func:`mixtune.schema.build` then types and validates the result.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

from mixtune import configs
from mixtune.errors import ConfigError

log = logging.getLogger(__name__)


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping.

    Plain ``safe_load`` keeps the last value, so a second ``train:`` block silently replaces the
    first. Merge keys (``<<: *defaults``) still work, and a key given both by a merge and
    explicitly takes the explicit value, as YAML says.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: MappingNode) -> None:
        # construct_mapping flattens first, and flattening is what mutates a mapping (it
        # prepends the merged keys, also into the mappings merged from): so a mapping's keys
        # are checked here, as written, the first time it is flattened.
        if id(node) not in self._checked:
            self._checked.add(id(node))
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # an unhashable (complex) key: construct_mapping refuses it
                    continue
                if seen:
                    raise ConstructorError(
                        problem=f"duplicate key {key!r} (first given on line {first[key]})",
                        problem_mark=key_node.start_mark,
                    )
                first[key] = key_node.start_mark.line + 1
        super().flatten_mapping(node)


def read_yaml(path: str | Path) -> dict:
    """The top-level mapping of a YAML config file (empty for an empty file); ConfigError for
    a missing file, a directory, non-UTF-8 text, invalid YAML, a duplicate key or a
    non-mapping top level. A missing ``configs/<name>.yaml`` (the README's examples, run from
    outside the repository) is read from the copy shipped in the package, with a log line."""
    p = Path(path)
    shipped = configs.shipped_copy(p)
    if shipped is not None:
        log.info("%s: not here; using the example shipped with mixtune (%s)", p, shipped)
        p = shipped
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; give a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.load(p.read_bytes().decode("utf-8-sig"), Loader=ConfigLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(data).__name__}")
    check_expanded_size(data, str(p))
    return data


MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 64


def check_expanded_size(data: Any, where: str) -> None:
    """Refuse YAML whose aliases (``&a`` / ``*a``) expand to a huge or self-containing value.

    PyYAML shares an aliased value instead of copying it, so a "billion laughs" file loads
    instantly, but anything that walks it (validation, JSON dumps) would take forever; a value
    that contains itself would recurse without end. Configs are small: this counts values with
    aliases expanded and stops early.
    """
    stack, seen = [(data, 1)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(
                f"{where}: more than {MAX_YAML_VALUES:,} values once YAML aliases "
                "(&name / *name) are expanded; write the config out without them"
            )
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(
                f"{where}: nested more than {MAX_YAML_DEPTH} levels deep (a YAML "
                "alias inside the value it names?)"
            )
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``dotted.key=value`` to the raw mapping (the value is parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. train.lr=5e-5")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    check_expanded_size(value, f"override '{key.strip()}'")
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            idx = _list_index(node, part, where)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"override '{item}': '{'.'.join(parts[:i])}' is not a section")


def _list_index(node: list, part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        idx = int(part)
        if not -len(node) <= idx < len(node):
            raise ConfigError(f"override {where}: index out of range (list has {len(node)})")
        return idx
    for idx, entry in enumerate(node):
        if isinstance(entry, dict) and entry.get("name") == part:
            return idx
    names = [e.get("name") for e in node if isinstance(e, dict)]
    raise ConfigError(f"override {where}: no entry named '{part}'; entries are {names}")
