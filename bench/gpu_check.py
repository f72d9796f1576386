"""GPU check: real-model settings on one CUDA device in a few minutes.

    python bench/gpu_check.py                 # on a CUDA machine: everything below
    python bench/gpu_check.py --quick         # smaller and shorter (what tests run on CPU)
    python bench/gpu_check.py --json out.json

For the built-in model and a randomly initialised ~100M-parameter Llama-shaped model (hidden
768, 12 layers, 12 heads, intermediate 2048, the built-in 4,096-token tokenizer), trained on
built-in domains:

1. training throughput under the default precision (bf16 autocast over fp32 master weights on a
   bf16 GPU; fp32 on a CPU), padded and packed (``train.packing``): useful (non-padding)
   tokens/s over the timed steps, MFU (6 x parameters x tokens/s over the device's peak dense
   bf16 FLOP/s, ``--peak-tflops``; none on a CPU) and peak device memory;
2. exactness on the device: a DynaMiCS probe (a few real optimizer steps on one dataset, then
   the restore) and a DynamixSFT look-ahead (one virtual Adam step, then the restore) leave every
   trainable tensor, the optimizer's moments and the RNG bit-identical to before;
3. that bf16 autocast keeps fp32 master weights (dtype of every trainable tensor);
4. packed rows under the attention implementation a user would pick (``flash_attention_2``
   where the flash-attn package is installed, its variable-length kernel; ``sdpa`` otherwise)
   give the per-example losses of padded rows under ``eager`` attention, and, with
   flash-attn, the ~100M model's packed throughput under it.

Each line says ``ok`` or ``FAIL``; the exit status is 1 if anything failed. Without a GPU the
same checks run on the CPU, small (``--quick``), so the script itself is tested
(tests/test_gpu_check.py); only the numbers need the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

BIG = {
    "model_type": "llama",
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "max_position_embeddings": 1024,
}
SMALL = {
    **BIG,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


def run_config(out: Path, model: dict | None, steps: int, batch: int, packing: bool) -> dict:
    data = ["arithmetic", "code", "dialogue"]
    return {
        "output_dir": str(out),
        "seed": 0,
        "max_steps": steps,
        "resume": "never",
        "progress": False,
        "model": {"tokenizer": "builtin", "config": model} if model else {},
        "datasets": [{"name": d, "path": f"builtin:{d}"} for d in data],
        "evals": [
            {"name": d, "path": f"builtin:{d}", "split": "dev", "batches": 2, "batch_size": 8}
            for d in data
        ],
        "mixer": {"name": "proportional"},
        "train": {
            "batch_size": batch,
            "lr": 1e-4,
            "max_length": 256,
            "eval_every": 0,
            "log_every": steps,
            "save_every": 0,
            "packing": packing,
        },
    }


def throughput(raw: dict, warmup: int) -> dict:
    from mixtune import config
    from mixtune.engine.loop import Trainer

    marks: list[tuple[float, int]] = []

    class Timed(Trainer):
        def _count(self, ds, ex, stats):
            super()._count(ds, ex, stats)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), self.counters["input_tokens"]))

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Timed(config.from_dict(raw))
    params = sum(p.numel() for p in trainer.acc.unwrap_model(trainer.model).parameters())
    trainer.run()
    (t0, n0), (t1, n1) = marks[warmup - 1], marks[-1]
    return {
        "params": params,
        "tokens_per_s": (n1 - n0) / (t1 - t0),
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else None,
        "master_fp32": all(p.dtype == torch.float32 for p in trainer.params),
        "autocast": trainer.acc.mixed_precision,
    }


def packed_attention_check(model_cfg: dict | None, impl: str, device: str) -> dict:
    """Per-example summed NLL of 64 built-in examples: packed rows under ``impl`` vs padded
    rows under eager attention, same weights, under the device's autocast (bf16 on a GPU)."""
    import numpy as np

    from mixtune.builtin import load_domain
    from mixtune.config import ModelConfig
    from mixtune.engine import build
    from mixtune.eval.domains import _example_sums

    results = {}
    cfg = ModelConfig(tokenizer="builtin", config=model_cfg) if model_cfg else ModelConfig()
    tok = build.load_tokenizer(cfg)
    recs = load_domain("dialogue", "dev", 32) + load_domain("code", "dev", 32)
    ids = [np.array(tok(r["prompt"] + " " + r["response"])["input_ids"][:256]) for r in recs]
    sums = {}
    for name, attn, rows in (("padded", "eager", None), ("packed", impl, 256)):
        with_attn = dataclasses.replace(cfg, attn_implementation=attn)
        model = build.load_model(with_attn, tok, 0, torch.float32)
        model.to(device).eval()
        with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            sums[name] = _example_sums(model, ids, [x.copy() for x in ids], 0, device, rows)[0]
    # bf16 autocast: each kernel rounds differently; fp32 on a CPU: float rounding only
    rel = ((sums["packed"] - sums["padded"]).abs() / sums["padded"].abs().clamp_min(1)).max()
    results["max_rel_diff"] = float(rel)
    results["ok"] = bool(rel < (2e-2 if device == "cuda" else 1e-5))
    return results


def restore_checks(raw: dict) -> dict:
    """A DynaMiCS probe and a DynamixSFT look-ahead leave the training state bit-identical."""
    from mixtune import config
    from mixtune.engine import probe
    from mixtune.engine.loop import Trainer
    from mixtune.engine.snapshot import unwrap_optimizer

    trainer = Trainer(config.from_dict({**raw, "max_steps": 3}))
    trainer.run(stop_after=2)  # moments exist, the RNG has moved
    state = trainer.state

    def capture():
        opt = unwrap_optimizer(state.optimizer)
        moments = [t.clone() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        return [p.detach().clone() for p in state.params], moments, torch.get_rng_state(), cuda

    def same(a, b):
        return all(
            (x is None and y is None)
            or (torch.equal(x, y) if not isinstance(x, list) else same(x, y))
            for x, y in zip(a, b)
        )

    out = {}
    before = capture()
    probe.probe(state, 0, steps=2, n_batches=1)
    out["probe restores bit-identically"] = same(before, capture())
    probe.lookahead(state, 1, optimizer="adam", batch_size=4, key=7)
    out["look-ahead restores bit-identically"] = same(before, capture())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small models, few steps")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 (H100/H200)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.warmup, a.batch_size = 4, 2, 8
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device: {device}; torch {torch.__version__}", flush=True)
    big = SMALL if a.quick else BIG
    results, ok = {"device": device, "runs": {}, "checks": {}}, True
    with tempfile.TemporaryDirectory(prefix="mixtune-gpu-check-") as tmp:
        for model_name, model in (("built-in", None), ("llama-100M", big)):
            for packing in (False, True):
                name = f"{model_name}, {'packed' if packing else 'padded'}"
                raw = run_config(
                    Path(tmp) / name.replace(", ", "-"), model, a.steps, a.batch_size, packing
                )
                r = throughput(raw, a.warmup)
                mfu = 6 * r["params"] * r["tokens_per_s"] / (a.peak_tflops * 1e12) if cuda else None
                r["mfu"] = mfu
                results["runs"][name] = r
                peak = f"{r['peak_mib']:.0f} MiB" if r["peak_mib"] is not None else "n/a"
                print(
                    f"{name:22s} {r['params'] / 1e6:7.1f}M params  "
                    f"{r['tokens_per_s']:10.0f} tok/s  "
                    f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'}  peak {peak}  "
                    f"autocast {r['autocast']}",
                    flush=True,
                )
                check = f"fp32 master weights ({name})"
                results["checks"][check] = r["master_fp32"]
        flash = cuda and importlib.util.find_spec("flash_attn") is not None
        impl = "flash_attention_2" if flash else "sdpa"
        if flash:
            name = "llama-100M, packed, flash_attention_2"
            raw = run_config(Path(tmp) / "flash", big, a.steps, a.batch_size, True)
            raw["model"]["attn_implementation"] = impl
            r = throughput(raw, a.warmup)
            r["mfu"] = 6 * r["params"] * r["tokens_per_s"] / (a.peak_tflops * 1e12)
            results["runs"][name] = r
            print(f"{name:22s} {r['tokens_per_s']:10.0f} tok/s  MFU {r['mfu']:.1%}", flush=True)
        check = packed_attention_check(big, impl, "cuda" if cuda else "cpu")
        results["packed_attention"] = {"implementation": impl, **check}
        print(f"packed {impl} vs padded eager: max relative difference {check['max_rel_diff']:.2e}")
        results["checks"][f"packed rows under {impl} = padded rows"] = check["ok"]
        raw = run_config(Path(tmp) / "restore", big, 3, a.batch_size, False)
        results["checks"].update(restore_checks(raw))
    for check, passed in results["checks"].items():
        print(f"{'ok  ' if passed else 'FAIL'} {check}")
        ok &= passed
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
