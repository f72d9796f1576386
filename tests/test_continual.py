"""The continual setting: stage expansion, the driver and its stage hooks, the metrics, LM
episodes and the CLI."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_MODEL, write_jsonl
from mixtune.cli import main
from mixtune.config import MethodConfig
from mixtune.continual import config as continual_config
from mixtune.continual.driver import run_sequence
from mixtune.continual.hooks import StageContext
from mixtune.continual.metrics import summarize
from mixtune.continual.stages import SAFETY_BUFFER, SAFETY_EVAL, stage_config
from mixtune.errors import ConfigError
from mixtune.mixers.proxymix import controller as ctl
from mixtune.mixers.proxymix import setting
from mixtune.mixers.proxymix.learn import LMEnv
from mixtune.mixers.proxymix.reinforce import Learner, decisions
from mixtune.rawconfig import read_yaml


@pytest.fixture
def continual(tmp_path, data_dir):
    write_jsonl(
        data_dir / "safe.jsonl",
        [{"prompt": f"Do harm {i}", "response": "I can't."} for i in range(40)],
    )

    def make(**top):
        raw = {
            "output_dir": str(tmp_path / "cont"),
            "seed": 0,
            "steps_per_stage": 4,
            "buffer_size": 16,
            "eval_batches": 1,
            "eval_batch_size": 8,
            "max_new_tokens": 4,
            "stages": [
                {"name": "add", "path": str(data_dir / "add.jsonl")},
                {"name": "rev", "path": str(data_dir / "rev.jsonl")},
            ],
            "safety_eval": {"path": str(data_dir / "safe.jsonl")},
            "safety_buffer": {"path": str(data_dir / "safe.jsonl"), "max_examples": 16},
            "model": {"tokenizer": "byte", "config": dict(TINY_MODEL)},
            "train": {
                "batch_size": 8,
                "lr": 3e-3,
                "max_length": 64,
                "eval_every": 0,
                "log_every": 2,
            },
            "mixer": {"name": "proxymix", "policy": "random", "decisions": 2},
            "transfer": {"check": False},
        }
        raw.update(top)
        return raw

    return make


def test_stage_configs_hold_the_current_task_and_earlier_buffers_only(continual, data_dir):
    raw = continual(
        stages=[{"name": n, "path": str(data_dir / "add.jsonl")} for n in ("a", "b", "c")]
    )
    cc = setting.load(data=raw)
    mixer = MethodConfig("proxymix", {"policy": "fixed"})
    for s, expect in enumerate([["a"], ["b", "a"], ["c", "a", "b"]]):
        cfg = stage_config(
            cc, ("a", "b", "c"), s, mixer, model_path=None if s == 0 else f"/prev/stage-{s}"
        )
        assert [d.name for d in cfg.datasets] == expect + [SAFETY_BUFFER]
        assert sorted(e.name for e in cfg.evals) == sorted(expect + [SAFETY_EVAL])
        assert [d.max_examples for d in cfg.datasets[1:-1]] == [16] * s  # buffers
        assert cfg.datasets[0].max_examples is None
        if s:  # chained from the previous stage's model, same tokenizer
            assert cfg.model.name_or_path == f"/prev/stage-{s}" and cfg.model.config is None
            assert cfg.model.tokenizer == "byte"


@pytest.mark.parametrize(
    "change, match",
    [
        ({"sequences": [["add", "nope"]]}, "sequences"),
        ({"stages": []}, "stages"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"model": {"tokenizer": "byte", "lora": {"enabled": True}}}, "model.lora"),
        ({"mixer": {"name": "proxymix", "policy": "fixed", "p_min": 2}}, "mixer.p_min"),
        ({"datasets": []}, "stages"),
    ],
)
def test_bad_continual_configs(continual, change, match):
    raw = continual(**change)
    if "datasets" in change:
        del raw["stages"]
    with pytest.raises(ConfigError, match=match):
        setting.load(data=raw)


def test_metrics_on_a_known_matrix():
    rows = [{"add": 0.8}, {"add": 0.5, "rev": 0.9}, {"add": 0.6, "rev": 0.4, "mul": 0.7}]
    loss = [{"add": 1.0}, {"add": 1.5, "rev": 1.0}, {"add": 1.2, "rev": 2.0, "mul": 1.0}]
    recs = [
        {
            "task": t,
            "eval": {k: {"accuracy": a[k], "loss": ls[k]} for k in a},
            "seconds": 1,
            "train_flops": 2,
            "input_tokens": 3,
            "steps": 4,
            "params": 5,
            "weights": [{"step": 0, t: 0.75}],
        }
        for t, a, ls in zip(["add", "rev", "mul"], rows, loss)
    ]
    out = summarize(["add", "rev", "mul"], recs, safety=False)
    assert out["average_accuracy"] == pytest.approx((0.6 + 0.4 + 0.7) / 3)
    assert out["forgetting"] == pytest.approx(((0.8 - 0.6) + (0.9 - 0.4)) / 2)
    assert out["vulnerability"] == pytest.approx({"add": 0.5, "rev": 1.0})
    assert out["replay_share"] == [0.25] * 3


def test_sequence_run_writes_matrix_masks_future_tasks_and_resumes(continual, tmp_path):
    cc = setting.load(data=continual())
    res = run_sequence(cc, ("add", "rev"), tmp_path / "seq")
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / "seq" / name).is_file()
    assert res["accuracy"][0][1] is None and res["accuracy"][1][0] is not None
    assert res["safety"]["start_accuracy"] is not None and len(res["safety"]["accuracy"]) == 2
    first, second = res["records"]
    assert all("rev" not in w for w in first["weights"])  # the future task is not a slot
    assert all(w["add"] > 0 for w in first["weights"])
    assert [o["slots"] for o in second["trajectory"]][0] == ["rev", "add", SAFETY_BUFFER]
    assert second["trajectory"][-1]["end"] is True
    assert not (tmp_path / "seq/stage-01-add/checkpoints").exists()
    assert (tmp_path / "seq/stage-02-rev/final/config.json").is_file()
    stamp = (tmp_path / "seq/stage-01-add/stage.json").stat().st_mtime_ns
    again = run_sequence(cc, ("add", "rev"), tmp_path / "seq")  # finished stages are reused
    assert (tmp_path / "seq/stage-01-add/stage.json").stat().st_mtime_ns == stamp
    assert again["accuracy"] == res["accuracy"]


def test_stage_configs_hold_only_the_users_mixer_options(continual, tmp_path):
    """The stage context reaches the mixer through its hooks; the saved config is the user's."""
    run_sequence(setting.load(data=continual()), ("add", "rev"), tmp_path / "seq")
    for stage in ("stage-01-add", "stage-02-rev"):
        saved = read_yaml(tmp_path / "seq" / stage / "config.yaml")["mixer"]
        assert saved == {"name": "proxymix", "policy": "random", "decisions": 2}


def test_a_mixer_without_stage_hooks_runs_every_sequence(continual, tmp_path):
    from mixtune.continual.run import run

    raw = continual(mixer={"name": "uniform"})
    del raw["transfer"]  # the method-agnostic config: no ProxyMix sections
    msgs = []
    report = run(continual_config.load(data=raw), echo=msgs.append)
    assert report["mixer"] == {"name": "uniform"} and report["sequences"] == [["add", "rev"]]
    assert (tmp_path / "cont/summary.md").is_file() and "summary in" in msgs[-1]
    second = json.loads((tmp_path / "cont/stage-02-rev/stage.json").read_text())
    assert second["carry"] == {} and second["trajectory"] == []
    assert all(w["add"] == pytest.approx(1 / 3) for w in second["weights"])


def test_stage_context_checks_its_index():
    with pytest.raises(ValueError, match="index"):
        StageContext(current="a", index=2, n_stages=2)


def test_lm_episodes_are_deterministic_with_a_seed(continual, tmp_path):
    cc = setting.load(data=continual())
    learner = Learner(cc.learn, seed=0)
    eps = [LMEnv(cc, tmp_path / f"l{i}").episode(learner, 0) for i in range(2)]
    assert eps[0]["trajectories"] == eps[1]["trajectories"]
    assert eps[0]["terminal"] == eps[1]["terminal"]
    ds = decisions(eps[0]["trajectories"], cc.learn)
    assert len(ds) >= 2 and all(d.mask.sum() >= 2 for d in ds)
    other = LMEnv(cc, tmp_path / "l2").episode(learner, 1)  # another episode: another seed
    assert other["trajectories"] != eps[0]["trajectories"]


def test_cli_learn_then_run_with_the_frozen_controller(continual, tmp_path, capsys):
    raw = continual(
        learn={
            "episodes": 1,
            "proxy": {"model": {"config": {"hidden_size": 16, "intermediate_size": 32}}},
        },
        transfer={"probe_steps": 2},
    )
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(raw))
    assert main(["proxymix", "learn", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[learn] episode 1/1" in out
    controller = tmp_path / "cont/learn/controller.pt"
    _, info = ctl.load(controller)
    assert info["meta"]["episodes"] == 1 and info["ranking"]
    assert (
        main(
            [
                "proxymix",
                "run",
                str(path),
                "mixer.policy=controller",
                f"mixer.controller={controller}",
                f"output_dir={tmp_path}/target",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "target/summary.json").read_text())
    assert "transfer_check" in summary and summary["policy_cost"]["episodes"] == 1
    assert summary["mixer"]["policy"] in ("controller", "fixed")  # fixed = the fallback
    assert main(["proxymix", "run", str(path), "mixer.policy=controller"]) == 2


def test_controller_transfers_to_a_larger_model_unchanged(continual, tmp_path):
    """The same frozen file drives runs of two model sizes (features are scale-free)."""
    path = ctl.save(tmp_path / "c.pt", ctl.new(0))
    raw = continual(
        mixer={"name": "proxymix", "policy": "controller", "controller": str(path), "decisions": 2}
    )
    small = run_sequence(setting.load(data=raw), ("add", "rev"), tmp_path / "s")
    raw["model"]["config"] = dict(TINY_MODEL, hidden_size=48, num_hidden_layers=3)
    big = run_sequence(setting.load(data=raw), ("add", "rev"), tmp_path / "b")
    assert big["cost"]["params"] > small["cost"]["params"]
    for res in (small, big):
        w = [o["weights"] for o in res["records"][1]["trajectory"] if o.get("weights")]
        assert all(x[0] >= 0.3 - 1e-9 for x in w)


def test_transfer_fallback_to_fixed_replay(continual, tmp_path, monkeypatch):
    from mixtune.mixers.proxymix import run as run_mod
    from mixtune.mixers.proxymix import transfer

    path = ctl.save(tmp_path / "c.pt", ctl.new(0), {"add": 0.1, "rev": 0.2, "safety": 0.3})
    seen = {}

    def fake_check(cc, info, out, start):
        seen["proxy"] = info["vulnerability"]
        return {
            "statistic": "spearman",
            "value": -1.0,
            "items": ["add", "rev", "safety"],
            "threshold": 0.6,
            "passed": False,
            "conclusive": True,
        }

    monkeypatch.setattr(transfer, "check", fake_check)
    raw = continual(
        mixer={
            "name": "proxymix",
            "policy": "controller",
            "controller": str(path),
            "decisions": 2,
            "replay_ratio": 0.5,
        },
        transfer={"check": True},
    )
    msgs = []
    report = run_mod.run(setting.load(data=raw), echo=msgs.append)
    assert seen["proxy"] == {"add": 0.1, "rev": 0.2, "safety": 0.3}
    assert any("falling back to fixed replay" in m for m in msgs)
    assert report["mixer"]["policy"] == "fixed"
    res = json.loads((tmp_path / "cont/results.json").read_text())
    assert res["replay_share"][1] == pytest.approx(0.5)  # stage 2: the fallback's 50% replay


def test_references_carry_over_exactly_between_stages(continual, tmp_path):
    """The just-learned task starts the next stage at ratio 1 and safety where it ended: the
    mixer's observations and references always use the same evaluation batches."""
    raw = continual(
        eval_batches=2,
        mixer={"name": "proxymix", "policy": "random", "decisions": 2, "eval_batches": 1},
    )
    res = run_sequence(setting.load(data=raw), ("add", "rev"), tmp_path / "seq")
    first, second = (r["trajectory"] for r in res["records"])
    assert first[-1]["end"] and not second[0].get("end")
    assert second[0]["ratios"]["add"] == pytest.approx(1.0, rel=1e-5)
    assert second[0]["safety"] == pytest.approx(first[-1]["safety"], rel=1e-5)
    assert first[0]["ratios"]["add"] == pytest.approx(1.0, rel=1e-9)


def test_warmup_runs_once_and_is_reused(continual, tmp_path, data_dir):
    from mixtune.continual.driver import warmup

    raw = continual(
        warmup={
            "steps": 2,
            "train": {"lr": 1e-2},
            "datasets": [{"name": "pre", "path": str(data_dir / "add.jsonl")}],
        }
    )
    cc = setting.load(data=raw)
    path = warmup(cc, tmp_path / "wu")
    assert (tmp_path / "wu/final/config.json").is_file()
    assert not (tmp_path / "wu/checkpoints").exists()
    stamp = (tmp_path / "wu/summary.json").stat().st_mtime_ns
    assert warmup(cc, tmp_path / "wu") == path
    assert (tmp_path / "wu/summary.json").stat().st_mtime_ns == stamp
    cfg = json.loads((tmp_path / "wu/summary.json").read_text())
    assert cfg["steps"] == 2
    assert "lr: 0.01" in (tmp_path / "wu/config.yaml").read_text()
