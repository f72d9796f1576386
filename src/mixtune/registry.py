"""The method registry: every mixer, loss and planner by name, where it lives, what it needs.

One line per method. A method's module is imported the first time the method is asked for, so
this module imports none of them: :mod:`mixtune.config` validates a run's method options through
it without importing the methods at load time, and no import cycle runs config -> methods ->
data/eval -> config. Tests and plugins add methods with ``MIXERS.register(name, cls)``.

A method class provides:

- ``Config``: a frozen dataclass of its options (or ``None``: it takes none). The options are
  parsed into it once, when the run config loads (``cfg.mixer.options``).
- ``check_run(options, cfg)`` (optional, static): checks of its options against the whole run
  config (e.g. a fixed mixture's dataset names), raising ConfigError; called at load.
- ``requires`` (optional): the capabilities it needs from the run that drives it, as a set of
  names, or a callable ``requires(options) -> {capability: why}`` when they depend on its
  options (the reason names the option, e.g. ``"mixer.slopes: gradient alignment ..."``).

Capabilities are the words below. A driver (``mixtune train``, the HF Trainer adapter) says
which it lacks and why (:func:`check`), so no shared module ever names a method.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator, Mapping, MutableMapping

from mixtune.errors import ConfigError
from mixtune.schema import MethodConfig, build

CAPABILITIES = {
    "evaluate": "per-domain evaluation during training",
    "probe": "short branch training runs from a snapshot of the training state, then restored",
    "lookahead": "one virtual optimizer step on a batch, and forward-only per-example losses",
    "random_access": "revisiting training examples by index",
    "whole_params": "whole (unsharded) parameters and gradients on every rank",
    "train_losses": "per-dataset training losses",
    "fixed_length": "a run length (max_steps) fixed from the start: not raised on resume",
    "padded_rows": "one training example per row of a micro-batch (weights per example)",
    "example_slots": "micro-batches of micro_batch_size examples each, in sampler order",
}


class Registry(MutableMapping):
    """Name -> method class, imported lazily from ``"module:attribute"``.

    ``registry[name] = cls`` replaces an entry (what ``monkeypatch.setitem`` does in tests);
    :meth:`register` adds a new one and refuses a taken name.
    """

    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self._entries: dict[str, str | type] = dict(entries)

    def register(self, name: str, target: str | type) -> None:
        """Add a method (a class, or ``"module:attribute"``); a taken name is an error."""
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = target

    def __setitem__(self, name: str, target: str | type) -> None:
        self._entries[name] = target

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __getitem__(self, name: str):
        target = self._entries[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            self._entries[name] = target
        return target

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get_class(self, name: str, section: str):
        """The class registered as ``name``; ConfigError naming ``section`` if there is none."""
        if name not in self._entries:
            raise ConfigError(
                f"{section}.name: unknown {self.kind} '{name}'; registered: {sorted(self)}"
            )
        return self[name]

    def option_names(self, name: str, section: str) -> set[str]:
        """The options the method ``name`` takes (the fields of its ``Config``; none without)."""
        options_cls = getattr(self.get_class(name, section), "Config", None)
        return {f.name for f in dataclasses.fields(options_cls)} if options_cls else set()

    def options(self, cfgm: MethodConfig, section: str):
        """The method's validated options dataclass (None when it takes no options)."""
        options_cls = getattr(self.get_class(cfgm.name, section), "Config", None)
        if options_cls is None:
            if cfgm.params:
                raise ConfigError(
                    f"{section}.{next(iter(cfgm.params))}: unknown key; "
                    f"{self.kind} '{cfgm.name}' takes no options"
                )
            return None
        return build(options_cls, cfgm.params, section)


MIXERS = Registry(
    "mixer",
    {
        "uniform": "mixtune.mixers.static:Uniform",
        "proportional": "mixtune.mixers.static:Proportional",
        "temperature": "mixtune.mixers.static:Temperature",
        "fixed": "mixtune.mixers.static:Fixed",
        "dynamics": "mixtune.mixers.dynamics.mixer:DynaMiCS",
        "dynamixsft": "mixtune.mixers.dynamixsft:DynamixSFT",
        "exp3": "mixtune.mixers.exp3:EXP3",
        "proxymix": "mixtune.mixers.proxymix.mixer:ProxyMix",
    },
)

LOSSES = Registry(
    "loss",
    {
        "sft": "mixtune.losses.sft:SFT",
        "dft": "mixtune.losses.dft:DFT",
        "cadft": "mixtune.losses.cadft:CADFT",
    },
)

PLANNERS = Registry("planner", {"mergemix": "mixtune.planners.mergemix:MergeMix"})


def requirements(cls, options=None) -> dict[str, str]:
    """What a method class needs: ``{capability: why}`` (its ``requires``, see the module doc).

    Without ``options``: only what it needs whatever its options (a ``requires`` set), so a
    driver can refuse a method before its options are even read.
    """
    req = getattr(cls, "requires", None)
    if req is None:
        return {}
    if callable(req):
        req = req(options) if options is not None else {}
    if not isinstance(req, Mapping):
        req = {c: f"{getattr(cls, '__name__', cls)} needs {CAPABILITIES[c]}" for c in req}
    unknown = set(req) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"{cls}: unknown capabilities {sorted(unknown)}; known: {CAPABILITIES}")
    return dict(req)


def check_run(cls, options, cfg) -> None:
    """The method's own checks against the run config (its ``check_run``), if it has any."""
    hook = getattr(cls, "check_run", None)
    if hook is not None:
        hook(options, cfg)


def check(needs: dict[str, str], lacking: dict[str, str]) -> None:
    """ConfigError for the first capability in ``needs`` that the driver is ``lacking``.

    Both map a capability to a reason: ``needs`` says why the method wants it (naming its
    option), ``lacking`` why the driver cannot give it and how to change that.
    """
    for cap, why in needs.items():
        if cap in lacking:
            raise ConfigError(f"{why}; but {lacking[cap]}")


def build_method(registry: Registry, cfgm: MethodConfig, section: str, *args):
    """Instantiate a method from its config section, with its options parsed once."""
    cls = registry.get_class(cfgm.name, section)
    options = cfgm.options if cfgm.options is not None else registry.options(cfgm, section)
    return cls(options, *args)
