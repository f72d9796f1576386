"""Config hygiene: the habits of other tools fail at once with a line saying what to write.

Unknown keys (did you mean; TRL / transformers spellings), duplicate YAML keys, ``~`` and
``$VAR`` in paths, switching mixer or loss from the command line, ``train.epochs``, missing
trackers, a local model path that is not there, and the example configs shipped in the package.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import yaml

from mixtune import cli, config, configs, rawconfig
from mixtune.engine import loop
from mixtune.errors import ConfigError

ROOT = Path(__file__).parent.parent


def _base(tmp_path, **top) -> dict:
    return {
        "output_dir": str(tmp_path / "run"),
        "datasets": [{"name": "a", "path": "a.jsonl"}, {"name": "b", "path": "b.jsonl"}],
        **top,
    }


def _write(tmp_path, raw, name="cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------------------------------------
# Unknown keys


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.learning_rate=1e-4", "train.learning_rate: unknown key; did you mean train.lr?"),
        ("learning_rate=1e-4", "learning_rate: unknown key; did you mean train.lr?"),
        ("train.lrr=1", "train.lrr: unknown key; did you mean train.lr?;"),
        ("train.warmup_step=1", "did you mean train.warmup_steps?"),
        ("train.num_train_epochs=3", "did you mean train.epochs?"),
        ("train.max_seq_length=256", "did you mean train.max_length?"),
        ("train.logging_steps=5", "did you mean train.log_every?"),
        ("train.save_steps=5", "did you mean train.save_every?"),
        ("train.weight_decay_rate=0.1", "did you mean train.weight_decay?"),
        ("warmup_steps=10", "did you mean train.warmup_steps? (warmup_steps is a train setting)"),
        ("train.max_steps=10", "did you mean max_steps? (max_steps is a top-level key)"),
        ("bf16=true", "did you mean model.dtype?"),
        ("model.lora.lora_r=8", "model.lora.lora_r: unknown key; did you mean model.lora.r?"),
        ("model.model_name_or_path=x", "did you mean model.name_or_path?"),
        ("mixer.name=temperature", None),
        ("mixer.taw=3", "mixer.taw: unknown key; did you mean mixer.tau?"),
    ],
)
def test_unknown_keys_say_what_was_meant(tmp_path, override, message):
    data = _base(tmp_path, mixer={"name": "temperature"})
    if message is None:
        config.load(data=data, overrides=[override])
        return
    with pytest.raises(ConfigError) as e:
        config.load(data=data, overrides=[override])
    assert message in str(e.value) and "allowed keys are" in str(e.value)
    assert "\n" not in str(e.value)


def test_batch_spellings_explain_the_global_batch(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load(data=_base(tmp_path), overrides=["train.per_device_train_batch_size=4"])
    text = str(e.value)
    assert "did you mean train.micro_batch_size?" in text
    assert "train.batch_size, the global batch of one optimizer step" in text
    with pytest.raises(ConfigError) as e:
        config.load(data=_base(tmp_path), overrides=["train.gradient_accumulation_steps=4"])
    assert "accumulation = batch_size / (micro_batch_size x processes)" in str(e.value)


def test_a_foreign_key_exits_2_with_one_line(tmp_path, capsys):
    path = _write(tmp_path, {**_base(tmp_path), "train": {"num_train_epochs": 3}})
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixtune: error: train.num_train_epochs")
    assert "did you mean train.epochs?" in err[0]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Duplicate keys


def test_a_duplicate_key_names_the_key_and_line(tmp_path):
    text = "output_dir: x\ntrain:\n  lr: 0.1\ndatasets: []\ntrain:\n  batch_size: 4\n"
    with pytest.raises(
        ConfigError, match=r"\(line 5\): duplicate key 'train' \(first given on line 2"
    ):
        rawconfig.read_yaml(_write(tmp_path, text))
    nested = "train:\n  lr: 0.1\n  batch_size: 2\n  lr: 0.2\n"
    with pytest.raises(ConfigError, match=r"line 4\): duplicate key 'lr'"):
        rawconfig.read_yaml(_write(tmp_path, nested))
    flow = "train: {lr: 0.1, lr: 0.2}\n"  # the same line twice
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        rawconfig.read_yaml(_write(tmp_path, flow))


def test_merge_keys_still_work(tmp_path):
    text = (
        "defaults: &d {lr: 0.1, batch_size: 4}\n"
        "more: &m\n  <<: *d\n  lr: 0.2\n"  # an explicit key over a merged one: allowed
        "train:\n  <<: *m\n  warmup_steps: 3\n"
        "also: {<<: [*d, *m]}\n"  # a merge of mappings that share keys: allowed
    )
    data = rawconfig.read_yaml(_write(tmp_path, text))
    assert data["more"] == {"lr": 0.2, "batch_size": 4}
    assert data["train"] == {"lr": 0.2, "batch_size": 4, "warmup_steps": 3}
    assert data["also"]["batch_size"] == 4


# ---------------------------------------------------------------------------------------------
# ~ and environment variables in paths


def test_home_and_variables_expand_in_every_path_field(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATA", str(tmp_path / "data"))
    (tmp_path / "model").mkdir()
    monkeypatch.setenv("MODELS", str(tmp_path))
    raw = {
        "output_dir": "~/runs/x",
        "resume": "$HOME/ckpt",
        "model": {"name_or_path": "${MODELS}/model", "tokenizer": "$MODELS/model"},
        "datasets": [{"name": "a", "path": "$DATA/a.jsonl"}, {"name": "b", "path": "~/b.jsonl"}],
        "evals": [{"name": "e", "path": "${DATA}/e.jsonl"}],
    }
    cfg = config.load(data=raw)
    assert cfg.output_dir == str(tmp_path / "home/runs/x")
    assert cfg.resume == str(tmp_path / "home/ckpt")
    assert cfg.model.name_or_path == cfg.model.tokenizer == str(tmp_path / "model")
    assert [d.path for d in cfg.datasets] == [
        str(tmp_path / "data/a.jsonl"),
        str(tmp_path / "home/b.jsonl"),
    ]
    assert cfg.evals[0].path == str(tmp_path / "data/e.jsonl")
    assert "$" not in config.to_dict(cfg)["output_dir"]


@pytest.mark.parametrize(
    "override,field",
    [
        ("output_dir=$MIXTUNE_UNSET_VAR/x", "output_dir"),
        ("datasets.a.path=${MIXTUNE_UNSET_VAR}/a.jsonl", "datasets.a.path"),
        ("model.name_or_path=$MIXTUNE_UNSET_VAR", "model.name_or_path"),
        ("evals=[{name: e, path: $MIXTUNE_UNSET_VAR/e.jsonl}]", "evals.e.path"),
    ],
)
def test_an_unset_variable_names_the_field(tmp_path, monkeypatch, override, field):
    monkeypatch.delenv("MIXTUNE_UNSET_VAR", raising=False)
    with pytest.raises(ConfigError, match=rf"^{field}: environment variable \$MIXTUNE_UNSET_VAR"):
        config.load(data=_base(tmp_path), overrides=[override])


def test_output_dir_under_home_is_not_a_directory_named_tilde(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, make_config(max_steps=1, output_dir="~/runs/x"))
    assert cli.main(["train", str(path), "train.eval_every=0"]) == 0
    assert (tmp_path / "home/runs/x/summary.json").is_file()
    assert not (tmp_path / "~").exists()


# ---------------------------------------------------------------------------------------------
# Switching the mixer or the loss from the command line


def test_switching_mixer_drops_the_old_mixers_options(tmp_path, caplog):
    path = _write(
        tmp_path, _base(tmp_path, mixer={"name": "dynamixsft", "gamma": 0.2, "update_every": 5})
    )
    with caplog.at_level(logging.WARNING, logger="mixtune.config"):
        cfg = config.load(path, ["mixer.name=exp3"])
    assert cfg.mixer.name == "exp3" and cfg.mixer.params == {"update_every": 5}  # exp3 takes it
    assert "mixer: dropped options ['gamma'] not used by mixer 'exp3'" in caplog.text
    cfg = config.load(path, ["mixer.name=uniform"])
    assert cfg.mixer.params == {}


def test_dropping_is_only_for_a_name_changed_on_the_command_line(tmp_path):
    written = _write(tmp_path, _base(tmp_path, mixer={"name": "uniform", "gamma": 0.2}))
    with pytest.raises(ConfigError, match="mixer.gamma: unknown key"):
        config.load(written)  # the file itself is wrong
    path = _write(tmp_path, _base(tmp_path, mixer={"name": "dynamixsft", "gamma": 0.2}), "b.yaml")
    with pytest.raises(ConfigError, match="mixer.gamma: unknown key"):
        config.load(path, ["mixer.name=exp3", "mixer.gamma=0.3"])  # given with the new name


def test_switching_loss_drops_the_old_losss_options(tmp_path, caplog):
    path = _write(tmp_path, _base(tmp_path, loss={"name": "cadft", "beta": 0.5}))
    with caplog.at_level(logging.WARNING, logger="mixtune.config"):
        cfg = config.load(path, ["loss.name=dft"])
    assert cfg.loss.name == "dft" and cfg.loss.params == {}
    assert "loss: dropped options ['beta'] not used by loss 'dft'" in caplog.text


# ---------------------------------------------------------------------------------------------
# train.epochs


def test_epochs_or_max_steps_not_both(tmp_path, caplog):
    assert config.load(data=_base(tmp_path)).max_steps == config.DEFAULT_MAX_STEPS
    cfg = config.load(data=_base(tmp_path, train={"epochs": 2}))
    assert cfg.max_steps is None and cfg.train.epochs == 2
    with pytest.raises(ConfigError, match="max_steps and train.epochs: give one of them"):
        config.load(data=_base(tmp_path, max_steps=10, train={"epochs": 2}))
    with pytest.raises(ConfigError, match="train.epochs: must be finite and > 0"):
        config.load(data=_base(tmp_path, train={"epochs": 0}))
    # On the command line, one replaces the other as written in the file (with a notice).
    with caplog.at_level(logging.WARNING, logger="mixtune.config"):
        cfg = config.load(data=_base(tmp_path, max_steps=10), overrides=["train.epochs=1.5"])
    assert cfg.max_steps is None and cfg.train.epochs == 1.5
    assert "max_steps: dropped (10 from the file), train.epochs=1.5 given" in caplog.text
    cfg = config.load(data=_base(tmp_path, train={"epochs": 2}), overrides=["max_steps=7"])
    assert cfg.max_steps == 7 and cfg.train.epochs is None


@pytest.mark.parametrize(
    "epochs,sizes,batch,steps",
    [(1, [100, 60], 8, 20), (2, [100, 50], 8, 38), (0.5, [100, 50], 8, 10), (0.001, [10], 8, 1)],
)
def test_epochs_resolve_to_steps(tmp_path, epochs, sizes, batch, steps):
    cfg = config.load(data=_base(tmp_path, train={"epochs": epochs, "batch_size": batch}))
    resolved = config.resolve_epochs(cfg, sizes)
    assert resolved.max_steps == steps and resolved.train.epochs is None
    plain = config.load(data=_base(tmp_path, max_steps=5))
    assert config.resolve_epochs(plain, sizes) is plain


def test_an_epochs_run_records_its_steps_and_resumes(make_config, tmp_path, caplog):
    raw = make_config(max_steps=None)
    raw["train"].update(epochs=0.25, eval_every=0)
    path = _write(tmp_path, raw)
    # 200 - 16 held out + 120 - 16 held out = 288 examples; 0.25 * 288 / 8 = 9 steps
    with caplog.at_level(logging.INFO, logger="mixtune.config"):
        summary = loop.train(config.load(path))
    assert summary["steps"] == 9
    assert "288 training examples at train.batch_size=8 -> max_steps=9" in caplog.text
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert saved["max_steps"] == 9 and saved["train"]["epochs"] is None
    assert config.load(tmp_path / "run/config.yaml").max_steps == 9
    again = loop.Trainer(config.load(path))  # the same command again: the same run, resumed
    assert again.cfg.max_steps == 9 and again.resume_from.name == "step-000009"


# ---------------------------------------------------------------------------------------------
# Trackers and model paths


@pytest.mark.parametrize(
    "tracker,modules", [("tensorboard", ["tensorboard", "tensorboardX"]), ("wandb", ["wandb"])]
)
def test_a_missing_tracker_is_refused_before_the_run_dir(
    make_config, tmp_path, monkeypatch, capsys, tracker, modules
):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # import machinery: "not installed"
    path = _write(tmp_path, make_config(report_to=[tracker]))
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"mixtune: error: report_to: '{tracker}' is not installed; pip install {tracker} "
        "(or remove it from report_to)"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "name", ["./no-model", "../no-model", "/no/such/model", "~/no-model", "a/b/no-model"]
)
def test_a_missing_local_model_fails_at_once(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="^model.name_or_path: no such directory: "):
        config.load(data=_base(tmp_path, model={"name_or_path": name}))
    with pytest.raises(ConfigError, match="^model.tokenizer: no such directory: "):
        config.load(data=_base(tmp_path, model={"tokenizer": name}))


@pytest.mark.parametrize(
    "name", ["HuggingFaceTB/SmolLM2-135M", "gpt2", "package:nope", "builtin", "builtin-bench"]
)
def test_hub_and_special_model_names_are_not_checked(tmp_path, name):
    assert (
        config.load(data=_base(tmp_path, model={"name_or_path": name})).model.name_or_path == name
    )
    assert not config.looks_local(name)


def test_a_missing_local_model_exits_2_without_the_hub(make_config, tmp_path, capsys):
    raw = make_config()
    raw["model"] = {"name_or_path": str(tmp_path / "nope")}
    assert cli.main(["train", str(_write(tmp_path, raw))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mixtune: error: model.name_or_path: no such directory: {tmp_path / 'nope'}"]


# ---------------------------------------------------------------------------------------------
# The example configs, shipped in the package


def test_the_package_ships_the_repository_configs_unchanged():
    repo = {
        p.relative_to(ROOT / "configs").as_posix(): p for p in (ROOT / "configs").rglob("*.yaml")
    }
    shipped = {p.relative_to(configs.DIR).as_posix(): p for p in configs.DIR.rglob("*.yaml")}
    assert sorted(repo) == sorted(shipped), "copy configs/ into src/mixtune/configs/"
    for name, path in repo.items():
        assert path.read_bytes() == shipped[name].read_bytes(), (
            f"src/mixtune/configs/{name} differs from configs/{name}: copy it over"
        )
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"configs/*.yaml"' in pyproject and '"configs/accelerate/*.yaml"' in pyproject


def test_mixtune_configs_lists_and_copies(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["configs"]) == 0
    out = capsys.readouterr().out
    for name in ("static", "dynamics", "mergemix", "accelerate/fsdp"):
        assert name in out
    assert "static                      Static mixture: fine-tune on two built-in domains" in out
    assert cli.main(["configs", "static"]) == 0
    assert (tmp_path / "static.yaml").read_bytes() == (configs.DIR / "static.yaml").read_bytes()
    (tmp_path / "sub").mkdir()
    assert cli.main(["configs", "configs/dft.yaml", "sub"]) == 0
    assert (tmp_path / "sub/dft.yaml").is_file()
    capsys.readouterr()
    assert cli.main(["configs", "static"]) == 2  # never overwrites
    assert "static.yaml already exists" in capsys.readouterr().err
    assert cli.main(["configs", "nope"]) == 2


def test_a_readme_path_outside_the_repository_reads_the_shipped_config(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="mixtune.rawconfig"):
        cfg = config.load("configs/static.yaml", ["max_steps=5"])
    assert cfg.mixer.name == "temperature" and cfg.max_steps == 5
    assert "using the example shipped with mixtune" in caplog.text
    with pytest.raises(ConfigError, match="config file not found: configs/nope.yaml"):
        config.load("configs/nope.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/static.yaml").write_text(yaml.safe_dump(_base(tmp_path, max_steps=3)))
    assert config.load("configs/static.yaml").max_steps == 3  # a file that exists wins


@pytest.mark.parametrize(
    "name", [n for n in configs.examples() if n not in ("mergemix", "proxymix") and "/" not in n]
)
def test_every_shipped_run_config_loads(name):
    config.load(configs.DIR / f"{name}.yaml")
