"""Typed config machinery behind :mod:`mixtune.config`: raw mappings to frozen dataclasses.

- ``build(cls, raw, where)`` checks a mapping against a dataclass's type hints (str, int,
  float, bool, Literal, optional, tuples, nested dataclasses, dicts) and raises a one-line
  :class:`ConfigError` naming the field; methods (mixers, losses, planners) use it for their
  own option classes.
- ``check(ok, where, rule, value)``, ``check_name(name, where)`` and ``unique(names, where)``
  are the one validation style for what types cannot say (ranges, names, uniqueness), called
  from a config dataclass's ``__post_init__``: every message reads ``"<field>: <rule>, got
  <value>"``.
- ``to_dict`` turns configs back into plain data.
- ``expand_path(value, where)`` expands ``~`` and ``$VAR`` / ``${VAR}`` in a path field.

An unknown key's error suggests the closest allowed key (``train.lrr`` -> ``train.lr``), and a
config dataclass may list other tools' spellings of its keys in a ``SPELLINGS`` class variable
(``{"learning_rate": ("train.lr", "")}``), which the error then explains.

Reading the YAML file and applying ``key=value`` overrides is :mod:`mixtune.rawconfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from mixtune.errors import ConfigError


@dataclass(frozen=True)
class MethodConfig:
    """``name`` picks a registered method; ``params`` are its own options as written, and
    ``options`` the same parsed into the method's typed ``Config`` (filled in once, when the run
    config loads; not part of equality or of the saved config)."""

    name: str
    params: dict = field(default_factory=dict)
    options: Any = field(default=None, compare=False, repr=False)


def to_dict(obj) -> Any:
    """Plain data (dicts, lists, scalars) for YAML/JSON; method params are flattened."""
    if isinstance(obj, MethodConfig):
        return {"name": obj.name, **copy_raw(obj.params)}
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def build(cls, raw: Any, where: str):
    """Build dataclass ``cls`` from the mapping ``raw`` (None: all defaults), typing every
    field from its hints; ``where`` is the dotted path of ``raw`` in the config, named in
    errors (``"mixer"`` gives ``"mixer.c_max: expected an integer, got 'x'"``). Unknown keys
    and missing required ones are errors; ``__post_init__`` validation runs as usual."""
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
        raise ConfigError(_unknown_key(cls, where, unknown[0], sorted(fields)))
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: required key is missing")
    return cls(**kwargs)


def _unknown_key(cls, where: str, key: Any, allowed: list[str]) -> str:
    """The one-line error for an unknown ``key`` of section ``where``: the mixtune key when
    ``cls.SPELLINGS`` knows ``key`` as another tool's spelling (with what differs, if anything),
    else the closest allowed key (difflib), then the allowed keys."""
    parts = [f"{_join(where, str(key))}: unknown key"]
    spelled = getattr(cls, "SPELLINGS", {}).get(key) if isinstance(key, str) else None
    if spelled is not None:
        target, note = spelled
        parts.append(f"did you mean {target}? ({note or f'{key} is the transformers/TRL name'})")
    else:
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        if close:
            parts.append(f"did you mean {_join(where, close[0])}?")
    parts.append(f"allowed keys are {allowed}")
    return "; ".join(parts)


_VAR = re.compile(r"\$(?:\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand_path(value: str | None, where: str) -> str | None:
    """``value`` with a leading ``~`` (or ``~user``) and every ``$VAR`` / ``${VAR}`` expanded;
    ConfigError naming the field ``where`` for an environment variable that is not set (an
    unexpanded ``$HOME`` would silently become a directory of that name). A ``$`` not followed
    by a name is kept as written."""
    if value is None:
        return None

    def var(m: re.Match) -> str:
        name = m.group(1) if m.group(1) is not None else m.group(2)
        if name not in os.environ:
            raise ConfigError(
                f"{where}: environment variable ${name} is not set (in {_show(value)})"
            )
        return os.environ[name]

    expanded = _VAR.sub(var, value)
    return os.path.expanduser(expanded) if expanded.startswith("~") else expanded


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
        return build(tp, value, where)
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


def check(ok: bool, where: str, rule: str, value: Any) -> None:
    """ConfigError ``"<where>: <rule>, got <value>"`` unless ``ok``.

    ``where`` is the field's dotted path (``"train.lr"``, ``"mixer.c_max"``), ``rule`` what
    is allowed (``"must be > 0"``) and ``value`` what was given (shown by ``repr``, cut to 60
    characters), e.g. ``check(self.lr > 0, "train.lr", "must be > 0", self.lr)``.
    """
    if not ok:
        raise ConfigError(f"{where}: {rule}, got {_show(value)}")


def check_name(name: str, where: str) -> None:
    """ConfigError unless ``name`` is non-empty letters, digits, ``_`` or ``-`` (names become
    file names, metric keys and ``key=value`` override paths)."""
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ConfigError(f"{where}: '{name}' must be non-empty letters, digits, '_' or '-'")


def unique(names: Iterable[str], where: str) -> None:
    """ConfigError naming the first of ``names`` that appears twice."""
    seen = set()
    for n in names:
        if n in seen:
            raise ConfigError(f"{where}: name '{n}' is used twice; names must be unique")
        seen.add(n)


# The earlier private names, until their importers switch to the public ones.


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


def copy_raw(x):
    """A deep copy of plain YAML data (nested dicts and lists; other values shared)."""
    if isinstance(x, dict):
        return {k: copy_raw(v) for k, v in x.items()}
    if isinstance(x, list):
        return [copy_raw(v) for v in x]
    return x
