"""The ProxyMix replay controller: a small per-slot policy network and its frozen file.

Each slot i (current task, a replay buffer, the safety buffer) is scored by one shared MLP,
z_i = phi([x_i, mean_{j in A} x_j, g]), where x_i are the slot's scale-free features, the mean
runs over accessible slots only and g are global features (note §2.2 P4, [PROPOSAL]). The
weights are :func:`mixtune.mixers.proxymix.features.masked_policy` of z. Because phi is shared over
slots, one controller handles any number of buffers, and it never sees task identities.

The frozen file (``torch.save`` of plain data, loadable with ``weights_only=True``) holds the
weights, the architecture, the feature spec (names + version, checked on load), the proxy's
task-vulnerability ranking (for the pre-transfer check) and free-form metadata (proxy model,
episodes, cost).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mixtune.errors import ConfigError
from mixtune.mixers.proxymix.features import FEATURE_VERSION, FEATURES, GLOBALS

FORMAT = "mixtune-proxymix-controller"
BUILTIN = Path(__file__).parent / "builtin" / "controller.pt"
"""The controller shipped with mixtune (``mixer.controller: builtin``); see builtin/CARD.md."""


class Controller(nn.Module):
    def __init__(self, hidden: int = 64, layers: int = 2):
        super().__init__()
        self.arch = {"hidden": hidden, "layers": layers}
        width = 2 * len(FEATURES) + len(GLOBALS)
        mods: list[nn.Module] = []
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        self.head = nn.Linear(width, 1)
        self.body = nn.Sequential(*mods)
        with torch.no_grad():  # start close to the uniform policy
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (n,) for slot features ``x`` (n, F), globals ``g`` (G,), ``mask`` (n,) bool."""
        n = x.shape[0]
        pooled = x[mask].mean(0, keepdim=True).expand(n, -1)  # (n, F)
        inp = torch.cat([x, pooled, g.unsqueeze(0).expand(n, -1)], dim=-1)  # (n, 2F + G)
        return self.head(self.body(inp)).squeeze(-1)


def new(seed: int, hidden: int = 64, layers: int = 2) -> Controller:
    """A freshly initialised controller (deterministic in ``seed``)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Controller(hidden, layers)


def save(
    path: str | Path, net: Controller, vulnerability: dict | None = None, meta: dict | None = None
) -> Path:
    """Write the frozen controller file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vul = {k: float(v) for k, v in (vulnerability or {}).items()}
    blob = {
        "format": FORMAT,
        "feature_version": FEATURE_VERSION,
        "features": list(FEATURES),
        "globals": list(GLOBALS),
        "arch": dict(net.arch),
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "vulnerability": vul,
        "ranking": sorted(vul, key=lambda k: -vul[k]),  # most vulnerable first
        "meta": meta or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | Path, where: str = "mixer.controller") -> tuple[Controller, dict]:
    """-> (controller in eval mode, the file's other contents). Checks the feature spec.
    ``path`` ``builtin`` is the controller shipped with the package (:data:`BUILTIN`)."""
    p = BUILTIN if str(path) == "builtin" else Path(path)
    if not p.is_file():
        raise ConfigError(
            f"{where}: controller file not found: {p} (learn one with "
            "`mixtune proxymix learn CONFIG`)"
        )
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{where}: cannot read {p} ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ConfigError(f"{where}: {p} is not a ProxyMix controller file")
    if (
        tuple(blob["features"]) != FEATURES
        or tuple(blob["globals"]) != GLOBALS
        or blob["feature_version"] != FEATURE_VERSION
    ):
        raise ConfigError(
            f"{where}: {p} was learned with features {blob['features']} "
            f"(version {blob['feature_version']}); this mixtune uses "
            f"{list(FEATURES)} (version {FEATURE_VERSION}); learn it again"
        )
    net = Controller(**blob["arch"])
    net.load_state_dict(blob["state_dict"])
    net.eval()
    return net, {k: v for k, v in blob.items() if k != "state_dict"}
