"""DynaMiCS end to end on tiny models: schedules, options, a known-answer run, gradient
alignment, LoRA, resume and two processes."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_MODEL, write_jsonl
from helpers import torchrun
from mixtune import config
from mixtune.engine import probe
from mixtune.engine.loop import Trainer
from mixtune.engine.rundir import read_metrics
from mixtune.errors import ConfigError
from mixtune.mixers import DatasetInfo, DomainInfo
from mixtune.mixers.dynamics.mixer import DynaMiCS, DynaMiCSConfig
from mixtune.mixers.dynamics.schedule import horizon, schedule_steps
from mixtune.report import write_report


def test_schedules_are_the_papers_at_2048_steps_and_scale():
    assert schedule_steps("no_warmup", 2048) == [0, 64, 128, 256, 512, 1024]
    assert schedule_steps("light_warmup", 2048) == [0, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert schedule_steps("dense_warmup", 2048) == [0, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert schedule_steps("no_warmup", 256) == [0, 8, 16, 32, 64, 128]
    assert schedule_steps("dense_warmup", 64) == [0, 1, 2, 4, 8, 16, 32]  # duplicates merged
    assert schedule_steps("fixed", 100, interval=32) == [0, 32, 64, 96]
    steps = schedule_steps("no_warmup", 2048)
    assert [horizon(steps, s, 2048) for s in steps] == [64, 64, 128, 256, 512, 1024]


def test_bad_options_and_roles_are_config_errors():
    base = {"datasets": [{"name": "a", "path": "x.jsonl"}], "mixer": {"name": "dynamics"}}
    for bad, field in [
        ({"c_max": 0}, "mixer.c_max"),
        ({"schedule": "weekly"}, "mixer.schedule"),
        ({"lambda_min": 0}, "mixer.lambda_min"),
        ({"epsilons": [-1]}, "mixer.epsilons"),
    ]:
        with pytest.raises(ConfigError, match=field):
            config.load(data={**base, "mixer": {"name": "dynamics", **bad}})
    ds = [DatasetInfo("a", 10, 100)]
    with pytest.raises(ConfigError, match="role target or constraint"):
        DynaMiCS(DynaMiCSConfig(), ds, [DomainInfo("a", "monitor", "loss", None)], 0)
    acc = [DomainInfo("a", "constraint", "accuracy", None)]
    DynaMiCS(DynaMiCSConfig(), ds, acc, 0)  # probing handles accuracy constraints
    with pytest.raises(ConfigError, match="gradient_alignment needs metric: loss"):
        DynaMiCS(DynaMiCSConfig(slopes="gradient_alignment"), ds, acc, 0)


# ---------------------------------------------------------------------------------------------
# A known answer. Both datasets map "code <word>" to 8 letters: the target's are upper case, the
# regulariser's lower case. Training on the target alone teaches the model to answer in upper
# case, which raises the loss of the regulariser's held-out examples (the constraint) above the
# base model's; training on the regulariser protects it.


def _records(n: int, upper: bool, seed: int) -> list[dict]:
    rng = random.Random(seed)
    letters = "QRSTUVWXYZ" if upper else "qrstuvwxyz"
    return [
        {
            "prompt": "code " + "".join(rng.choice("abcdefgh") for _ in range(5)),
            "response": "".join(rng.choice(letters) for _ in range(8)),
        }
        for _ in range(n)
    ]


def toy_config(root: Path, name: str, mixer: dict, steps: int = 24, **train) -> dict:
    return {
        "output_dir": str(root / name),
        "seed": 0,
        "max_steps": steps,
        "progress": False,
        "model": {"tokenizer": "byte", "config": dict(TINY_MODEL)},
        "datasets": [
            {"name": "tgt", "path": str(root / "tgt.jsonl")},
            {"name": "reg", "path": str(root / "reg.jsonl")},
        ],
        "evals": [
            {
                "name": "tgt",
                "from_dataset": "tgt",
                "holdout": 16,
                "batches": 2,
                "batch_size": 8,
                "role": "target",
            },
            {
                "name": "reg",
                "from_dataset": "reg",
                "holdout": 16,
                "batches": 2,
                "batch_size": 8,
                "role": "constraint",
            },
        ],
        "mixer": mixer,
        "train": {
            "batch_size": 8,
            "lr": 3e-3,
            "max_length": 48,
            "eval_every": 4,
            "log_every": 4,
            "schedule": "constant",
            **train,
        },
    }


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_jsonl(root / "tgt.jsonl", _records(150, True, 0))
    write_jsonl(root / "reg.jsonl", _records(150, False, 1))
    return root


@pytest.fixture(scope="module")
def toy_runs(toy_root):
    only = Trainer(
        config.load(
            data=toy_config(toy_root, "target_only", {"name": "fixed", "weights": {"tgt": 1}})
        )
    ).run()
    dyn = Trainer(
        config.load(
            data=toy_config(
                toy_root, "dynamics", {"name": "dynamics", "schedule": "fixed", "interval": 4}
            )
        )
    ).run()
    return only, dyn


def _evals(run_dir):
    return {r["step"]: r["eval"] for r in read_metrics(run_dir) if "eval" in r}


def test_dynamics_keeps_the_constraint_that_target_only_breaks(toy_runs, toy_root):
    only, dyn = toy_runs
    ref = _evals(toy_root / "target_only")[0]["reg"]["loss"]
    assert _evals(toy_root / "dynamics")[0]["reg"]["loss"] == ref  # same base model
    # target-only breaks the constraint by the end ...
    assert only["final_eval"]["reg"]["loss"] > ref + 0.2
    # ... DynaMiCS never lets it go more than a little over its reference
    assert max(e["reg"]["loss"] for e in _evals(toy_root / "dynamics").values()) < ref + 0.05
    # and its best feasible checkpoint beats target-only's on the target
    b_only, b_dyn = only["best_feasible"], dyn["best_feasible"]
    assert b_dyn["feasible"] and b_dyn["step"] > b_only["step"]
    assert b_dyn["target_loss"] < b_only["target_loss"] - 0.2
    assert b_dyn["checkpoint"] is None or Path(b_dyn["checkpoint"]).is_dir()
    summary = json.loads((toy_root / "dynamics" / "summary.json").read_text())
    assert summary["best_feasible"]["step"] == b_dyn["step"]
    # it got there by giving the regulariser weight when the constraint was about to break
    weights = [r["weights"]["reg"] for r in read_metrics(toy_root / "dynamics") if "mixer" in r]
    assert weights[0] == 0.0 and max(weights) > 0.05


def test_dynamics_logs_slopes_predictions_and_choices(toy_runs, toy_root):
    recs = [r for r in read_metrics(toy_root / "dynamics") if "mixer" in r]
    assert [r["step"] for r in recs] == [0, 4, 8, 12, 16, 20]
    first = recs[0]["mixer"]
    assert first["references"] == {"reg": _evals(toy_root / "dynamics")[0]["reg"]["loss"]}
    assert first["roles"] == {"tgt": "target", "reg": "constraint"}
    S = first["S"]
    assert S["tgt"]["tgt"] < 0 < S["reg"]["tgt"] - S["reg"]["reg"]  # target data hurts reg more
    for r in recs:
        m = r["mixer"]
        assert {
            "S",
            "anchor",
            "predicted",
            "predicted_step",
            "horizon",
            "probe_steps",
            "lambda",
            "epsilon",
            "feasible",
            "max_violation",
            "probe_seconds",
        } <= set(m)
        assert m["horizon"] == 4 and m["probe_steps"] == 4 and m["probe_seconds"] > 0
    for prev, r in zip(recs, recs[1:]):
        m = r["mixer"]
        assert set(m["realised"]) == {"tgt", "reg"}
        if max(prev["weights"].values()) == 1.0:
            # a single-dataset mixture with c = H: the probe *was* the next interval's training,
            # so the prediction is exact (probes restore everything bit for bit)
            assert max(abs(e) for e in m["prediction_error"].values()) < 1e-5
    # the run's report draws the latest slope matrix as a heatmap (and its standard errors)
    page = write_report(toy_root / "dynamics").read_text()
    assert "<h2>mixer: S at step 20 (latest)</h2><img" in page
    assert "<h2>mixer: S_se at step 20 (latest)</h2><img" in page
    assert (toy_root / "dynamics/report/mixer_matrix_00.png").stat().st_size > 1000


def test_gradient_alignment_matches_a_one_step_probe_at_small_lr(toy_root):
    """−lr⟨g_i, d_j⟩ is the first-order change of L_i after one Adam step on dataset j."""
    raw = toy_config(toy_root, "ga_check", {"name": "uniform"}, lr=1e-4)
    t = Trainer(config.load(data=raw))
    for _ in range(3):  # some optimizer state first
        t.train_step(*t.sampler.next_batch(8))
        t.step += 1
    S = probe.grad_alignment(t.state, n_batches=2)
    now = t.evaluate(2, accuracy=False, use_cache=False)
    for j in range(2):
        after = probe.probe(t.state, j, 1, 2)
        for i, d in enumerate(["tgt", "reg"]):
            assert S[i, j] == pytest.approx(after[d]["loss"] - now[d]["loss"], rel=0.15)


def test_ga_batch_size_pins_the_alignment_batch_whatever_the_micro_batch(toy_root):
    """mixer.ga_batch_size reaches ctx.grad_alignment: the slopes then no longer follow
    train.micro_batch_size (the default alignment batch is micro_batch_size x processes)."""

    def slopes(micro: int, ga_batch_size) -> np.ndarray:
        mixer = {
            "name": "dynamics",
            "slopes": "gradient_alignment",
            "schedule": "fixed",
            "interval": 100,
            "probe_batches": 2,
            "ga_batch_size": ga_batch_size,
        }
        raw = toy_config(
            toy_root, f"ga_bs_{micro}_{ga_batch_size}", mixer, steps=1, micro_batch_size=micro
        )
        t = Trainer(config.load(data=raw))
        t.run()
        rec = next(r for r in read_metrics(toy_root / raw["output_dir"]) if "mixer" in r)
        return np.array([[rec["mixer"]["S"][d][k] for k in ("tgt", "reg")] for d in ("tgt", "reg")])

    pinned = [slopes(m, 8) for m in (2, 4)]
    np.testing.assert_allclose(pinned[0], pinned[1], rtol=1e-5, atol=1e-9)
    default = [slopes(m, None) for m in (2, 4)]
    assert np.abs(default[0] - default[1]).max() > 1e-3 * np.abs(default[0]).max()
    with pytest.raises(ConfigError, match="mixer.ga_batch_size"):
        config.load(data={**toy_config(toy_root, "x", {"name": "dynamics", "ga_batch_size": 0})})


@pytest.mark.parametrize("variant", ["lora_probe", "full_gradient_alignment"])
def test_variants_run_and_keep_weights_valid(toy_root, variant):
    mixer = {"name": "dynamics", "schedule": "fixed", "interval": 3, "n_lambda": 5}
    raw = toy_config(toy_root, variant, mixer, steps=6)
    if variant == "lora_probe":
        raw["model"]["lora"] = {"enabled": True, "r": 4, "alpha": 8}
    else:
        raw["mixer"]["slopes"] = "gradient_alignment"
    Trainer(config.load(data=raw)).run()
    recs = [r for r in read_metrics(toy_root / variant) if "mixer" in r]
    assert len(recs) == 2
    for r in recs:
        S = np.array([[r["mixer"]["S"][d][k] for k in ("tgt", "reg")] for d in ("tgt", "reg")])
        assert np.all(np.isfinite(S)) and S[0, 0] < 0
        assert abs(sum(r["weights"].values()) - 1) < 1e-9
        assert r["mixer"]["probe_steps"] == (3 if variant == "lora_probe" else 0)


@pytest.mark.slow
def test_resume_equals_uninterrupted(toy_root):
    mixer = {"name": "dynamics", "schedule": "fixed", "interval": 3}
    raw = toy_config(toy_root, "resume_full", mixer, steps=12, save_every=6)
    Trainer(config.load(data=raw)).run()
    raw["output_dir"] = str(toy_root / "resume_split")
    Trainer(config.load(data=raw)).run(stop_after=5)
    Trainer(config.load(data=raw)).run()

    def strip(recs):
        out = []
        for r in recs:
            r = {k: v for k, v in r.items() if k != "time"}
            if "mixer" in r:
                r["mixer"] = {k: v for k, v in r["mixer"].items() if not k.endswith("seconds")}
            out.append(r)
        return out

    assert strip(read_metrics(toy_root / "resume_full")) == strip(
        read_metrics(toy_root / "resume_split")
    )


WORKER = """
import json, sys
import torch.distributed as dist
from mixtune import config
from mixtune.engine.loop import Trainer
t = Trainer(config.load(data=json.load(open(sys.argv[1]))))
seen, propose = [], t.mixer.propose
def spy(ctx):
    w = propose(ctx)
    seen.append([float(x) for x in w])
    return w
t.mixer.propose = spy
t.run()
out = [None, None]
dist.all_gather_object(out, seen)
if t.rank == 0:
    json.dump(out, open(sys.argv[2], "w"))
from helpers import leave_distributed
leave_distributed()
"""


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_compute_the_same_weights(toy_root, tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not available")
    mixer = {"name": "dynamics", "schedule": "fixed", "interval": 4}
    raw = toy_config(toy_root, "two_proc", mixer, steps=12, micro_batch_size=2)
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    (tmp_path / "worker.py").write_text(WORKER)
    proc = torchrun(tmp_path / "worker.py", tmp_path / "cfg.json", tmp_path / "out.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = json.loads((tmp_path / "out.json").read_text())
    assert rank0 == rank1 and len(rank0) == 3  # bit-identical on both ranks
    # and the same as one process on the same global batches (up to summation order)
    raw["output_dir"] = str(toy_root / "one_proc")
    Trainer(config.load(data=raw)).run()
    single = [
        list(r["weights"].values()) for r in read_metrics(toy_root / "one_proc") if "mixer" in r
    ]
    assert np.allclose(single, rank0, atol=1e-3), (single, rank0)
