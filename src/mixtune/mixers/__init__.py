"""Mixers: the online policies that set the mixture weights.

The contract (what a mixer sees and provides) is :mod:`mixtune.mixers.base`; each mixer is one
module (ProxyMix one package) and one line in :data:`mixtune.registry.MIXERS`.
"""

from __future__ import annotations

from mixtune.mixers.base import (
    DatasetInfo,
    DomainInfo,
    LookaheadResult,
    MixContext,
    Mixer,
    Steps,
)

__all__ = ["DatasetInfo", "DomainInfo", "LookaheadResult", "MixContext", "Mixer", "Steps"]
