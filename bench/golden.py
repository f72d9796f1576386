"""Golden runs: the same configs must give bit-identical metrics and parameters across a refactor.

    python bench/golden.py record [CASE..] # writes bench/results/golden.json (named cases only)
    python bench/golden.py check           # re-runs and compares; exit 1 on any difference

Each case is one of the example configs (configs/<method>.yaml) cut down to a few steps with
dotted overrides, so every method's update rule, every loss and the probe/look-ahead machinery
run at least once. What is compared: every metrics.jsonl record with wall-clock fields removed,
and a SHA-256 over the last checkpoint's trainable tensors (names, shapes, dtypes and bytes).
Bit-identity is a property of one machine and one torch build: record and check on the same one.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "bench/results/golden.json"

SMALL = ["progress=false", "train.max_length=64", "train.batch_size=8", "train.log_every=1"]
CASES: dict[str, tuple[str, list[str]]] = {
    "static": ("configs/static.yaml", ["max_steps=6", "train.eval_every=3"]),
    "exp3": ("configs/exp3.yaml", ["max_steps=6", "train.eval_every=3"]),
    "dynamixsft": (
        "configs/dynamixsft.yaml",
        ["max_steps=6", "train.eval_every=3", "mixer.update_every=2"],
    ),
    "dynamics": (
        "configs/dynamics.yaml",
        [
            "max_steps=6",
            "train.eval_every=3",
            "mixer.c_max=2",
            "mixer.probe_batches=1",
            "mixer.schedule=fixed",
            "mixer.interval=3",
        ],
    ),
    "dynamics_lora": (
        "configs/dynamics.yaml",
        [
            "max_steps=4",
            "train.eval_every=2",
            "mixer.c_max=2",
            "mixer.probe_batches=1",
            "mixer.schedule=fixed",
            "mixer.interval=2",
            "model.lora.enabled=true",
            "train.lr=1e-3",
        ],
    ),
    "dft": ("configs/dft.yaml", ["max_steps=6", "train.eval_every=3"]),
    "cadft": (
        "configs/cadft.yaml",
        [
            "max_steps=8",
            "train.eval_every=4",
            "loss.rewrite.schedule=absolute",
            "loss.rewrite.warmup=3",
            "loss.rewrite.every=2",
            "loss.rewrite.fraction=0.01",
            "loss.rewrite.min_visits=1",
            "loss.rewriter.max_new_tokens=8",
        ],
    ),
}
TIMING_KEYS = {
    "time",
    "elapsed",
    "timing",
    "timings",
    "tok_per_s",
    "step_s",
    "wall_s",
    "throughput",
    "seconds",
    "secs",
}


def _strip(obj):
    if isinstance(obj, dict):
        return {
            k: _strip(v)
            for k, v in obj.items()
            if k not in TIMING_KEYS and not k.endswith(("_s", "_sec", "seconds", "_seconds_total"))
        }
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _param_hash(run: Path) -> str:
    from safetensors import safe_open

    ckpts = sorted((run / "checkpoints").glob("step-*"))
    path = ckpts[-1] / "trainable.safetensors"
    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            h.update(name.encode())
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(
                t.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()
            )
    return h.hexdigest()


def _diff(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [x for i, (u, v) in enumerate(zip(a, b)) for x in _diff(u, v, f"{path}[{i}]")]
    return [] if a == b else [path or "."]


def run_case(name: str, tmp: Path) -> dict:
    from mixtune.cli import main

    path, overrides = CASES[name]
    run = tmp / name
    code = main(["train", str(ROOT / path), f"output_dir={run}", *SMALL, *overrides])
    if code != 0:
        raise SystemExit(f"golden case {name}: mixtune train exited {code}")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return {"metrics": _strip(records), "params": _param_hash(run)}


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in ("record", "check"):
        print(__doc__)
        return 2
    names = argv[1:] or list(CASES)
    with tempfile.TemporaryDirectory() as d:
        got = {n: run_case(n, Path(d)) for n in names}
    if argv[0] == "record":  # the named cases replace theirs; the others are kept
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        kept = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        GOLDEN.write_text(json.dumps({**kept, **got}, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(got)} cases -> {GOLDEN}")
        return 0
    want = json.loads(GOLDEN.read_text())
    bad = []
    for n, g in got.items():
        w = want.get(n)
        if w is None:
            bad.append(f"{n}: no golden record")
        elif g["params"] != w["params"]:
            bad.append(f"{n}: parameters differ")
        elif g["metrics"] != w["metrics"]:
            i = (
                next(i for i, (a, b) in enumerate(zip(g["metrics"], w["metrics"])) if a != b)
                if len(g["metrics"]) == len(w["metrics"])
                else -1
            )
            where = ", ".join(_diff(g["metrics"][i], w["metrics"][i])[:5]) if i >= 0 else "count"
            bad.append(f"{n}: metrics differ (record {i}: {where})")
    for line in bad:
        print("DIFF", line)
    print(f"{len(got) - len(bad)}/{len(got)} cases bit-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
