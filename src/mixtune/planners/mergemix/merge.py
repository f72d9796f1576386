"""Weight-space merging: linear merges and task arithmetic over state dicts and peft adapters.

Pure functions on ``{name: tensor}`` mappings; nothing here touches a training loop. Every
merge accumulates in float32 tensor by tensor (so a bf16 model is merged without rounding the
partial sums) and casts the result back to the base tensor's dtype unless told otherwise.
Tensors that are not floating point (integer buffers) are copied from the base / first model
and must be equal in every input.

- :func:`linear`: θ = Σ_k w_k θ_k (a weighted average when the w sum to 1).
- :func:`task_vector`: τ = θ_expert − θ_base (float32).
- :func:`task_arithmetic`: θ = θ_base + Σ_k α_k τ_k (MergeMix's merge, Wang et al. 2026,
  arXiv 2601.17858, E2: with α on the simplex it equals the linear merge of the experts).
- :func:`lora_delta` / :func:`adapter_task_vector`: the dense update ΔW = s·B·A of a LoRA
  adapter (s = alpha/r, or alpha/√r with rsLoRA), keyed by the base model's parameter names,
  so adapters are merged as task vectors (merging A and B separately would not be linear).
- :func:`save_task_vector` / :func:`task_arithmetic_files`: task vectors cached as safetensors
  files and merged one tensor at a time (memory: the base plus one tensor per expert).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mixtune.errors import MixtuneError

StateDict = Mapping[str, torch.Tensor]


def _is_float(t: torch.Tensor) -> bool:
    return torch.is_floating_point(t)


def _check_keys(ref: StateDict, other: StateDict, what: str) -> None:
    if ref.keys() != other.keys():
        missing = sorted(set(ref) - set(other))[:3]
        extra = sorted(set(other) - set(ref))[:3]
        raise MixtuneError(f"{what}: keys differ (missing {missing}, unexpected {extra})")


def linear(
    state_dicts: Sequence[StateDict], weights: Sequence[float], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """θ = Σ_k w_k θ_k for every floating-point tensor (fp32 accumulation)."""
    if len(state_dicts) != len(weights) or not state_dicts:
        raise MixtuneError(
            f"linear merge: {len(state_dicts)} state dicts for {len(weights)} weights"
        )
    first = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], 1):
        _check_keys(first, sd, f"linear merge: state dict {i}")
    out = {}
    for name, t0 in first.items():
        if not _is_float(t0):
            for sd in state_dicts[1:]:
                if not torch.equal(sd[name], t0):
                    raise MixtuneError(f"linear merge: non-float tensor '{name}' differs")
            out[name] = t0.clone()
            continue
        acc = torch.zeros(t0.shape, dtype=torch.float32)
        for sd, w in zip(state_dicts, weights):
            acc.add_(sd[name].detach().to("cpu", torch.float32), alpha=float(w))
        out[name] = acc.to(dtype or t0.dtype)
    return out


def task_vector(base: StateDict, expert: StateDict) -> dict[str, torch.Tensor]:
    """τ = expert − base (float32) for every floating-point tensor of ``base``."""
    _check_keys(base, expert, "task vector")
    return {
        n: expert[n].detach().to("cpu", torch.float32) - t.detach().to("cpu", torch.float32)
        for n, t in base.items()
        if _is_float(t)
    }


def task_arithmetic(
    base: StateDict,
    task_vectors: Sequence[StateDict],
    alphas: Sequence[float],
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """θ = base + Σ_k α_k τ_k; a key absent from a task vector counts as a zero update."""
    if len(task_vectors) != len(alphas):
        raise MixtuneError(
            f"task arithmetic: {len(task_vectors)} task vectors for {len(alphas)} coefficients"
        )
    for i, tv in enumerate(task_vectors):
        unknown = [k for k in tv if k not in base]
        if unknown:
            raise MixtuneError(
                f"task arithmetic: task vector {i} has keys not in the base "
                f"model, e.g. {unknown[:3]}"
            )
    out = {}
    for name, t in base.items():
        if not _is_float(t):
            out[name] = t.clone()
            continue
        acc = t.detach().to("cpu", torch.float32).clone()
        for tv, a in zip(task_vectors, alphas):
            if name in tv and a != 0:
                acc.add_(tv[name].to("cpu", torch.float32), alpha=float(a))
        out[name] = acc.to(dtype or t.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# peft LoRA adapters

_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])"
    r"(?:\.(?P<adapter>[^.]+))?\.weight$"
)


def _pattern_value(module: str, pattern: Mapping, default):
    """peft's rank_pattern / alpha_pattern lookup: the key matches a suffix of the module."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def lora_delta(
    adapter: StateDict,
    *,
    alpha: float,
    rank_pattern: Mapping | None = None,
    alpha_pattern: Mapping | None = None,
    use_rslora: bool = False,
    fan_in_fan_out: bool = False,
    adapter_name: str | None = None,
) -> dict[str, torch.Tensor]:
    """Dense ``{base_param_name: s·B·A}`` (float32) of a LoRA adapter state dict.

    Accepts the keys of a saved adapter (``base_model.model.<module>.lora_A.weight``) or of a
    live peft model (``...lora_A.<adapter>.weight``; pick one with ``adapter_name``). The rank is
    read from A's shape; ``rank_pattern``/``alpha_pattern`` override per module as in peft.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in adapter.items():
        m = _LORA_KEY.match(key)
        if m is None:
            if "lora_" in key:
                raise MixtuneError(
                    f"adapter key '{key}': only plain LoRA (A, B) adapters can be "
                    "merged here (DoRA, LoRA biases and other variants cannot)"
                )
            continue
        if adapter_name is not None and m["adapter"] not in (None, adapter_name):
            continue
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise MixtuneError(f"adapter module '{module}': needs both lora_A and lora_B")
        a, b = ab["A"].to("cpu", torch.float32), ab["B"].to("cpu", torch.float32)
        r = _pattern_value(module, rank_pattern or {}, a.shape[0])
        lora_alpha = _pattern_value(module, alpha_pattern or {}, alpha)
        scale = lora_alpha / (r**0.5 if use_rslora else r)
        delta = (b @ a) * scale  # (out, in)
        out[f"{module}.weight"] = delta.T.contiguous() if fan_in_fan_out else delta
    return out


def adapter_task_vector(adapter_dir: str | Path, base: StateDict) -> dict[str, torch.Tensor]:
    """The task vector of a saved peft LoRA adapter directory, keyed like ``base``.

    Full tensors saved by ``modules_to_save`` become ``saved − base``.
    """
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg_path, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise MixtuneError(
            f"{d}: not a peft adapter directory (adapter_config.json and "
            "adapter_model.safetensors expected)"
        )
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise MixtuneError(f"{d}: only plain LoRA adapters can be merged as task vectors")
    sd = load_file(str(weights))
    out = lora_delta(
        sd,
        alpha=cfg["lora_alpha"],
        rank_pattern=cfg.get("rank_pattern"),
        alpha_pattern=cfg.get("alpha_pattern"),
        use_rslora=bool(cfg.get("use_rslora")),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out")),
    )
    for key, t in sd.items():
        if "lora_" in key:
            continue
        name = key.removeprefix("base_model.model.")
        if name not in base:
            raise MixtuneError(f"{d}: saved tensor '{key}' has no match in the base model")
        out[name] = t.to(torch.float32) - base[name].to("cpu", torch.float32)
    unknown = [k for k in out if k not in base]
    if unknown:
        raise MixtuneError(f"{d}: adapter targets modules the base model lacks, e.g. {unknown[:3]}")
    for name, delta in out.items():
        if delta.shape != base[name].shape:
            raise MixtuneError(
                f"{d}: update for '{name}' has shape {tuple(delta.shape)}, the "
                f"base tensor {tuple(base[name].shape)}"
            )
    return out


# ---------------------------------------------------------------------------------------------
# Task vectors cached on disk


def save_task_vector(tv: StateDict, path: str | Path) -> None:
    """Write a task vector as float32 safetensors (atomically: temp file, then rename)."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    save_file({k: v.to(torch.float32).contiguous() for k, v in tv.items()}, str(tmp))
    tmp.replace(p)


class _SafetensorsTensors(Mapping):
    """A safetensors file as a read-only mapping that loads one tensor per lookup."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self._h = safe_open(str(path), framework="pt")
        self._keys = list(self._h.keys())
        self._set = set(self._keys)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._set:
            raise KeyError(name)
        return self._h.get_tensor(name)

    def __contains__(self, name) -> bool:
        return name in self._set

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def task_arithmetic_files(
    base: StateDict,
    paths: Sequence[str | Path],
    alphas: Sequence[float],
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`task_arithmetic` reading each cached task vector one tensor at a time."""
    return task_arithmetic(base, [_SafetensorsTensors(p) for p in paths], alphas, dtype)
