"""Mixers: the online policies that set the mixture weights. An explicit registry."""

from __future__ import annotations

from mixtune.mixers.base import (
    DatasetInfo,
    DomainInfo,
    LookaheadResult,
    MixContext,
    Mixer,
    Steps,
)
from mixtune.mixers.dynamics import DynaMiCS
from mixtune.mixers.dynamixsft import DynamixSFT
from mixtune.mixers.exp3 import EXP3
from mixtune.mixers.proxymix import ProxyMix
from mixtune.mixers.static import Fixed, Proportional, Temperature, Uniform

MIXERS: dict[str, type] = {
    "uniform": Uniform,
    "proportional": Proportional,
    "temperature": Temperature,
    "fixed": Fixed,
    "dynamics": DynaMiCS,
    "dynamixsft": DynamixSFT,
    "exp3": EXP3,
    "proxymix": ProxyMix,
}


def build_mixer(cfg, datasets: list[DatasetInfo], domains: list[DomainInfo], seed: int) -> Mixer:
    """Instantiate the mixer named in ``cfg`` (a :class:`mixtune.config.MethodConfig`)."""
    from mixtune.config import method_options

    cls = MIXERS[cfg.name]
    return cls(method_options(cfg, MIXERS, "mixer"), datasets, domains, seed)


__all__ = [
    "MIXERS",
    "build_mixer",
    "DatasetInfo",
    "DomainInfo",
    "LookaheadResult",
    "MixContext",
    "Mixer",
    "Steps",
]
