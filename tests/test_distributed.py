"""One 2-process CPU run (gloo): same weights on both ranks, disjoint shards, params in sync,
and the same parameters as a single process on the same global batches."""

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import ChaseLoss
from mixtune import config
from mixtune.engine.loop import Trainer
from mixtune.mixers import MIXERS

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_two_process_run_matches_single_process(make_config, tmp_path, monkeypatch):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not available")
    raw = make_config(max_steps=6, mixer={"name": "chase"})
    raw["train"].update(batch_size=8, micro_batch_size=2, eval_every=3, log_every=1)
    raw["output_dir"] = str(tmp_path / "dist")
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [shutil.which("torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(HERE / "dist_worker.py"), str(tmp_path / "cfg.json"), str(tmp_path / "out.json")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out.json").read_text())
    assert res["world"] == [2, 2]
    assert res["weights"][0] == res["weights"][1]
    assert res["weights"][0] != [0.5, 0.5]  # the mixer did move (from all-reduced losses)
    assert res["same_global_batches"] and res["shards_cover_batches"] and res["shards_nonempty"]
    assert res["params_in_sync"]

    # The same run in one process (micro-batches of 2, accumulated 4 times) gives the same model.
    monkeypatch.setitem(MIXERS, "chase", ChaseLoss)
    single = Trainer(config.load(data=raw, overrides=[f"output_dir={tmp_path}/single"]))
    single.run()
    flat = torch.cat([p.detach().flatten() for p in single.params])
    torch.testing.assert_close(flat, torch.load(tmp_path / "out.json.params.pt"),
                               rtol=1e-4, atol=1e-5)
    assert single.sampler.weights.tolist() == pytest.approx(res["weights"][0], abs=1e-6)
