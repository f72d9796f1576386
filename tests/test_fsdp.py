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
    assert {
        "trainable.safetensors",
        "optimizer-rank0.pt",
        "optimizer-rank1.pt",
        "rank0.pt",
        "rank1.pt",
        "state.json",
    } <= set(out["checkpoint_files"])
    assert "optimizer.pt" not in out["checkpoint_files"]
    assert out["loaded_same"] and out["resumed_same"]
    # The final model directory holds the gathered full tensors.
    assert out["final_same"] and out["final_tensors"] > 10
    # A DDP checkpoint resumes sharded and trains on like the DDP run (fp round-off).
    assert out["from_ddp_max_diff"] < 1e-5


# --- mixtune's own FSDP2 mode (train.fsdp=true), through the CLI ---------------------------


def _fsdp_raw(tmp_path: Path, make_config, out: str, fsdp: bool = True) -> dict:
    raw = make_config(
        max_steps=8,
        output_dir=str(tmp_path / out),
        mixer={"name": "dynamixsft", "update_every": 2, "batch_size": 4},
    )
    # 3 eval batches: ranks hold 2 and 1, so the sharded evaluation must pad with a forward;
    # greedy accuracy on "add" runs generate() with synced ranks.
    raw["evals"][0].update(batches=3, batch_size=4, max_new_tokens=4)
    raw["evals"][1].update(batches=3, batch_size=4)
    raw["train"].update(
        batch_size=8, micro_batch_size=2, eval_every=4, log_every=1, save_every=0, fsdp=fsdp
    )
    return raw


@pytest.mark.dist
def test_fsdp_training_matches_ddp_and_resumes_after_sigterm(make_config, tmp_path):
    import torch
    import yaml
    from safetensors.torch import load_file

    from mixtune.engine import checkpoint
    from test_distributed_resume import _launch, _metrics, sigterm_after

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not available")

    def finish(name: str, fsdp: bool = True) -> Path:
        cfg = tmp_path / f"{name}.yaml"
        if not cfg.exists():
            cfg.write_text(yaml.safe_dump(_fsdp_raw(tmp_path, make_config, name, fsdp)))
        log = tmp_path / f"{name}.log"
        assert _launch(cfg, log).wait(600) == 0, log.read_text()[-3000:]
        return tmp_path / name

    fsdp, ddp = finish("fsdp"), finish("ddp", fsdp=False)
    # The same run sharded and replicated: same weights, evaluations and parameters.
    a, b = _metrics(fsdp), _metrics(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    moved = False
    for x, y in zip(a, b):
        if "weights" in x:
            assert x["weights"] == pytest.approx(y["weights"], abs=1e-5), x["step"]
            moved |= x["weights"]["add"] != 0.5
        if "eval" in x:
            assert x["eval"].keys() == y["eval"].keys()
            for d in x["eval"]:
                assert x["eval"][d] == pytest.approx(y["eval"][d], rel=1e-4), (x["step"], d)
    assert moved, "the mixer never moved"
    pa, pb = (load_file(str(r / "final" / "model.safetensors")) for r in (fsdp, ddp))
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5)

    # Sharded state through a graceful stop and a resume: equal to the uninterrupted run.
    cfg = tmp_path / "sig.yaml"
    cfg.write_text(yaml.safe_dump(_fsdp_raw(tmp_path, make_config, "sig")))
    run, log = tmp_path / "sig", tmp_path / "sig.log"
    sigterm_after(cfg, run, log, 3)
    found = checkpoint.complete(run / "checkpoints")
    assert len(found) == 1 and (found[0] / "optimizer-rank1.pt").is_file(), log.read_text()
    assert _launch(cfg, log).wait(600) == 0, log.read_text()[-3000:]
    assert _metrics(run) == _metrics(fsdp)
    ps = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(ps[k], pa[k]) for k in pa)

    # One process can evaluate a sharded run's checkpoint (its weights are whole) ...
    from mixtune import cli

    assert cli.main(["eval", str(fsdp), "--json"]) == 0
    ev = json.loads((fsdp / "eval.json").read_text())["eval"]
    assert ev["rev"]["loss"] == pytest.approx(a[-1]["eval"]["rev"]["loss"], rel=1e-5)
    # ... but not resume its sharded optimizer state: a clear error, nothing written.
    before = (fsdp / "metrics.jsonl").read_text()
    assert cli.main(["train", str(tmp_path / "fsdp.yaml"), "max_steps=10"]) == 2
    assert (fsdp / "metrics.jsonl").read_text() == before


def test_fsdp_refuses_features_that_need_whole_parameters(make_config):
    """Methods declare whole_params (registry.requires); train.fsdp lacks it: refused at load."""
    from mixtune import config
    from mixtune.errors import ConfigError

    raw = make_config(mixer={"name": "dynamics", "slopes": "gradient_alignment"})
    raw["train"]["fsdp"] = True
    for e, role in zip(raw["evals"], ("target", "constraint")):
        e.update(role=role, accuracy=False)
    with pytest.raises(ConfigError, match="mixer.slopes: DynaMiCS gradient alignment .*train.fsdp"):
        config.load(data=raw)
    config.load(data=raw, overrides=["train.fsdp=false"])  # without FSDP: fine
    raw = make_config(loss={"name": "cadft", "rewrite": {"enabled": True}})
    raw["train"]["fsdp"] = True
    with pytest.raises(ConfigError, match="loss.rewrite.enabled: CADFT rewriting .*train.fsdp"):
        config.load(data=raw)
    # CADFT's weights alone are fine
    raw["loss"]["rewrite"]["enabled"] = False
    config.load(data=raw)


def test_fsdp_on_one_process_trains_as_usual(make_config, caplog):
    from mixtune import config
    from mixtune.engine.loop import Trainer

    raw = make_config(max_steps=2)
    raw["train"]["fsdp"] = True
    with caplog.at_level("WARNING"):
        summary = Trainer(config.load(data=raw)).run()
    assert summary["steps"] == 2
    assert "a single process has nothing to shard" in caplog.text
