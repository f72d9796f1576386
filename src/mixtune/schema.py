"""Typed YAML -> frozen dataclass machinery behind :mod:`mixtune.config`.

``build(cls, raw, where)`` checks a mapping against a dataclass's type hints (str, int, float,
bool, Literal, optional, tuples, nested dataclasses, dicts) and raises a one-line
:class:`ConfigError` naming the field; ``apply_override`` applies one dotted ``key=value``;
``to_dict`` turns configs back into plain data. Methods (mixers, losses, planners) use ``build``
for their own option classes.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mixtune.errors import ConfigError


@dataclass(frozen=True)
class MethodConfig:
    """``name`` picks a registered method; ``params`` are its own options as written, and
    ``options`` the same parsed into the method's typed ``Config`` (filled in once, when the run
    config loads; not part of equality or of the saved config)."""

    name: str
    params: dict = field(default_factory=dict)
    options: Any = field(default=None, compare=False, repr=False)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; give a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8-sig"))
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


def to_dict(obj) -> Any:
    """Plain data (dicts, lists, scalars) for YAML/JSON; method params are flattened."""
    if isinstance(obj, MethodConfig):
        return {"name": obj.name, **_deepcopy(obj.params)}
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def build(cls, raw: Any, where: str):
    """Build dataclass ``cls`` from a mapping (used by methods for their own options)."""
    return _build(cls, raw, where)


def _build(cls, raw: Any, where: str):
    if cls is MethodConfig:
        return _build_method(raw, where)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(
            f"{_join(where, unknown[0])}: unknown key; allowed keys are {sorted(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: required key is missing")
    return cls(**kwargs)


DEFAULT_METHODS = {"mixer": "proportional", "loss": "sft"}


def _build_method(raw: Any, where: str) -> MethodConfig:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'name', got {_show(raw)}")
    raw = dict(raw)
    name = raw.pop("name", DEFAULT_METHODS.get(where))
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name: required, a string")
    return MethodConfig(name=name, params=raw)


def _coerce(tp, value: Any, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        allowed = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{where}: expected {allowed}, got {_show(value)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: got {_show(value)}; allowed values are {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            if args and args[-1] is Ellipsis and not dataclasses.is_dataclass(args[0]):
                value = [value]
            else:
                raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        if args and args[-1] is Ellipsis:
            items = []
            for i, v in enumerate(value):
                label = v.get("name") if isinstance(v, dict) and "name" in v else i
                items.append(_coerce(args[0], v, f"{where}[{label}]"))
            return tuple(items)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {_show(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_show(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {_show(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_show(value)}")
        if math.isnan(value):
            raise ConfigError(f"{where}: expected a number, got NaN")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_show(value)}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")


def _check(ok: bool, where: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{where}: {rule}, got {_show(value)}")


def _check_name(name: str, where: str) -> None:
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ConfigError(f"{where}: '{name}' must be non-empty letters, digits, '_' or '-'")


def _unique(names: list[str], where: str) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise ConfigError(f"{where}: name '{n}' is used twice; names must be unique")
        seen.add(n)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is tuple:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _deepcopy(x):
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x
