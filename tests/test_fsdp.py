"""The probe snapshot and checkpoints on FSDP2-sharded state, 2 CPU processes (torchrun, gloo).

accelerate enables FSDP on GPUs only, so ``fsdp_worker.py`` shards the Trainer's model with
torch's ``fully_shard`` itself and runs mixtune's probe, look-aheads and example losses on it.
"""

import json
import shutil
from pathlib import Path

import pytest

from helpers import torchrun

HERE = Path(__file__).parent


@pytest.mark.dist
def test_probe_and_lookahead_restore_fsdp2_shards_exactly(make_config, tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not available")
    raw = make_config(max_steps=20, output_dir=str(tmp_path / "run"))
    raw["train"]["micro_batch_size"] = 2
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    proc = torchrun(HERE / "fsdp_worker.py", tmp_path / "cfg.json", tmp_path / "out.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["world"] == 2 and out["sharded"]
    # Each rank holds half of the trainable parameters, and so does its snapshot.
    assert out["local_fraction"] == pytest.approx(0.5, abs=0.01)
    assert out["snapshot_fraction"] == out["local_fraction"]
    # The branches did something: the probe's two steps lowered both losses, look-aheads moved.
    assert all(v < 0 for v in out["probe_moved"].values()), out["probe_moved"]
    assert all(abs(v) > 1e-4 for v in out["lookahead_moved"].values()), out["lookahead_moved"]
    # ... and left every shard, moment, LR, sampler position and RNG exactly as they were; the
    # per-example losses equal the look-ahead's own "before" losses on the same batch.
    assert out["after_probe_same"] and out["after_lookahead_same"]
    assert out["example_losses_equal_pre"]
    # The next forward sees the restored shards (not FSDP2's gathered copy of the probe's
    # values), and training continues bit for bit like a twin run that never probed.
    assert out["eval_same"] and out["continued_same"] and out["eval_after_same"]
    # Checkpoints of sharded state: full trainable tensors (gathered) plus one optimizer shard
    # per rank; a fresh sharded trainer loads it and trains on bit for bit like the original.
    assert {"trainable.safetensors", "optimizer-rank0.pt", "optimizer-rank1.pt", "rank0.pt",
            "rank1.pt", "state.json"} <= set(out["checkpoint_files"])
    assert "optimizer.pt" not in out["checkpoint_files"]
    assert out["loaded_same"] and out["resumed_same"]
    # The final model directory holds the gathered full tensors.
    assert out["final_same"] and out["final_tensors"] > 10
