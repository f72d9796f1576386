"""2-process CPU runs (torchrun, gloo) against 1-process runs of the same global batches.

For every registered mixer (and the CADFT loss): every rank sets the same weights at every
update (exactly, and logs the same mixer diagnostics), the ranks step on the same global batches
and split them disjointly, the parameters stay in sync, and weights at every update and the
final parameters match a single process (micro-batches of 2 accumulated 4 times instead of 2) to
floating-point tolerance. The ``*_fsdp`` cases repeat this with the 2-process run sharded by
``train.fsdp`` (FSDP2). Each case is one torchrun invocation (~15-40 s on 2 cores), so only
the two hard ones (look-ahead and probing) run by default; the rest are ``slow``.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_worker import collect
from helpers import ChaseLoss, torchrun
from mixtune.registry import MIXERS

HERE = Path(__file__).parent
slow = pytest.mark.slow

# name -> (mixer options, loss options, overrides of the eval domains' roles)
ROLES = {"add": "target", "rev": "constraint"}
CASES = {
    "dynamixsft": ({"name": "dynamixsft", "update_every": 2, "batch_size": 4}, None, None),
    "dynamics": (
        {"name": "dynamics", "schedule": "fixed", "interval": 3, "c_max": 2, "probe_batches": 2},
        None,
        ROLES,
    ),
    "uniform": ({"name": "uniform"}, None, None),
    "proportional": ({"name": "proportional", "by": "tokens"}, None, None),
    "temperature": ({"name": "temperature", "tau": 3.0}, None, None),
    "fixed": ({"name": "fixed", "weights": {"add": 3, "rev": 1}}, None, None),
    "exp3": ({"name": "exp3", "update_every": 2, "warmup_steps": 0}, None, None),
    "dynamixsft_adam": (
        {"name": "dynamixsft", "update_every": 2, "batch_size": 4, "optimizer": "adam"},
        None,
        None,
    ),
    "dynamixsft_progress": (
        {"name": "dynamixsft", "update_every": 2, "batch_size": 4, "reward": "progress"},
        None,
        None,
    ),
    "dynamics_grad_alignment": (
        {
            "name": "dynamics",
            "slopes": "gradient_alignment",
            "schedule": "fixed",
            "interval": 3,
            "probe_batches": 2,
            "ga_batch_size": 4,
        },
        None,
        ROLES,
    ),
    "proxymix": (
        {"name": "proxymix", "policy": "random", "explore_sigma": 0.5, "update_every": 2},
        None,
        None,
    ),
    "chase": ({"name": "chase"}, None, None),
    # CADFT: global z-scores all-reduced over ranks, and rewriting (rank 0 generates) at steps
    # 2-5 (the scaled schedule); with a moving mixer.
    "cadft_exp3": (
        {"name": "exp3", "update_every": 2, "warmup_steps": 0},
        {"name": "cadft", "rewrite": {"fraction": 0.02, "prob": 1.0, "min_visits": 1}},
        None,
    ),
}
# The same under mixtune's FSDP2 (train.fsdp): sharded vs one process (CADFT without rewriting,
# which FSDP refuses). The CLI-level FSDP test runs in CI (tests/test_fsdp.py).
FSDP = {
    "dynamics_fsdp": "dynamics",
    "dynamixsft_adam_fsdp": "dynamixsft_adam",
    "exp3_fsdp": "exp3",
    "proxymix_fsdp": "proxymix",
}
CASES["cadft_fsdp"] = (
    {"name": "exp3", "update_every": 2, "warmup_steps": 0},
    {"name": "cadft", "rewrite": {"enabled": False}},
    None,
)
FSDP["cadft_fsdp"] = "cadft_fsdp"
for _name, _base in list(FSDP.items()):
    CASES.setdefault(_name, CASES[_base])
# The same with padding-free packing (train.packing): one packed row per micro-batch.
PACKED = {
    "dynamixsft_packed": "dynamixsft",
    "dynamics_packed": "dynamics",
    "exp3_packed": "exp3",
    "cadft_packed": "cadft_exp3",  # per-example weights on packed tokens, rewriting on
}
for _name, _base in PACKED.items():
    CASES.setdefault(_name, CASES[_base])
# Micro-batches filled by tokens (train.micro_batch_tokens): ranks cut their shares differently
# but must run as many forwards (FSDP2 would hang otherwise).
TOKENS = {"exp3_tokens": "exp3", "exp3_tokens_fsdp": "exp3"}
FSDP["exp3_tokens_fsdp"] = "exp3"
for _name, _base in TOKENS.items():
    CASES.setdefault(_name, CASES[_base])
DEFAULT = ("dynamixsft", "dynamics")
# Reward / alignment batches default to micro_batch_size x processes: with the micro-batch
# pinned that grows with the process count, so the cases set mixer.batch_size (dynamixsft) or
# mixer.ga_batch_size (dynamics' gradient alignment).


def case_config(make_config, tmp_path, name: str) -> dict:
    mixer, loss, roles = CASES[name]
    raw = make_config(max_steps=6, mixer=dict(mixer))
    raw["train"].update(batch_size=8, micro_batch_size=2, eval_every=3, log_every=1)
    if loss is not None:
        raw["loss"] = loss
    if name in FSDP:
        raw["train"]["fsdp"] = True
    raw["train"]["packing"] = name in PACKED  # the other cases keep padded rows covered
    if name in TOKENS:
        del raw["train"]["micro_batch_size"]
        raw["train"]["micro_batch_tokens"] = 40
    for ev in raw["evals"]:
        ev["role"] = (roles or {}).get(ev["name"], "monitor")
    raw["output_dir"] = str(tmp_path / "dist")
    return raw


def run_two_processes(raw: dict, tmp_path: Path) -> tuple[dict, torch.Tensor]:
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    proc = torchrun(HERE / "dist_worker.py", tmp_path / "cfg.json", tmp_path / "out.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out.json").read_text())
    return res, torch.load(tmp_path / "out.json.params.pt")


@pytest.mark.dist
@pytest.mark.parametrize(
    "name", [n if n in DEFAULT else pytest.param(n, marks=slow) for n in CASES]
)
def test_two_processes_match_one(name, make_config, tmp_path, monkeypatch):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not available")
    raw = case_config(make_config, tmp_path, name)
    res, params2 = run_two_processes(raw, tmp_path)

    # Every rank: same global batches, disjoint shards covering them, params in sync.
    assert res["world"] == [2, 2]
    assert res["same_global_batches"] and res["shards_cover_batches"]
    assert res["shards_nonempty"] and res["params_in_sync"]
    # Same weights on every rank at every update, bit for bit (and the same diagnostics).
    rank0, rank1 = res["updates"]
    assert [u["step"] for u in rank0] == [u["step"] for u in rank1]
    assert len(rank0) >= 1
    assert rank0 == rank1

    # One process, same global batches: same weight trajectory and final parameters.
    monkeypatch.setitem(MIXERS, "chase", ChaseLoss)
    raw["output_dir"] = str(tmp_path / "single")
    single, params1, _ = collect(raw)
    assert [u["step"] for u in single["updates"]] == [u["step"] for u in rank0]
    for a, b in zip(single["updates"], rank0):
        assert a["weights"] == pytest.approx(b["weights"], abs=1e-5), a["step"]
        # ... and the numbers behind them (rewards, slopes, losses), not only the weights
        x, y = _leaves(a["mixer"]), _leaves(b["mixer"])
        assert x.keys() == y.keys()
        numeric = {
            k for k, v in y.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        assert {k: x[k] for k in numeric} == pytest.approx(
            {k: y[k] for k in numeric}, rel=1e-3, abs=1e-5, nan_ok=True
        ), a["step"]  # nan: no standard error (gradient-alignment slopes have none)
        assert {k: x[k] for k in x if k not in numeric} == {
            k: y[k] for k in y if k not in numeric
        }, a["step"]
    torch.testing.assert_close(params1, params2, rtol=1e-4, atol=1e-5)
    if name == "cadft_exp3":  # rank 0 rewrote the same targets as the single process

        def rewrites(run):
            lines = (tmp_path / run / "rewrites.jsonl").read_text().splitlines()
            return [
                (r["step"], r["dataset"], r["example"], r["new_text"])
                for r in map(json.loads, lines)
            ]

        assert rewrites("dist") and rewrites("dist") == rewrites("single")
    moving = ("dynamixsft", "dynamics", "exp3", "chase", "proxymix", "cadft_exp3")
    if name in (*moving, *FSDP, *PACKED, *TOKENS):
        assert any(u["weights"] != [0.5, 0.5] for u in rank0), "the mixer never moved"


def _leaves(tree, prefix="") -> dict:
    """Numeric leaves of a diagnostics tree, by path (booleans and strings kept as they are)."""
    if isinstance(tree, dict):
        return {
            k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}/{key}").items()
        }
    if isinstance(tree, list):
        return {
            k: v for i, sub in enumerate(tree) for k, v in _leaves(sub, f"{prefix}/{i}").items()
        }
    return {prefix: tree}
