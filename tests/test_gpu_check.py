"""bench/gpu_check.py runs its checks (small, on the CPU here) and they pass."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_quick_passes_on_this_device(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench/gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    assert mod.main(["--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["runs"]) == {
        f"{m}, {p}" for m in ("built-in", "llama-100M") for p in ("padded", "packed")
    }
    assert all(v["tokens_per_s"] > 0 for v in r["runs"].values())
    assert r["checks"]["probe restores bit-identically"] is True
    assert r["checks"]["look-ahead restores bit-identically"] is True
    assert r["packed_attention"]["implementation"] == "sdpa"  # no flash-attn on a CPU
    assert r["checks"]["packed rows under sdpa = padded rows"] is True
    assert "FAIL" not in capsys.readouterr().out
