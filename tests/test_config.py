import pytest
import yaml

from mixtune import config
from mixtune.errors import ConfigError


def _base(tmp_path):
    return {
        "output_dir": str(tmp_path),
        "datasets": [{"name": "a", "path": "a.jsonl"}, {"name": "b", "path": "b.jsonl"}],
    }


def test_defaults_and_overrides(tmp_path):
    cfg = config.load(
        data=_base(tmp_path),
        overrides=[
            "train.lr=5e-5",
            "max_steps=20",
            "datasets.b.max_examples=7",
            "datasets.0.repeat=false",
            "mixer.name=temperature",
            "mixer.tau=3",
        ],
    )
    assert cfg.train.lr == 5e-5 and cfg.max_steps == 20
    assert cfg.datasets[1].max_examples == 7 and cfg.datasets[0].repeat is False
    assert cfg.mixer.name == "temperature" and cfg.mixer.params == {"tau": 3}


def test_yaml_float_strings_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**_base(tmp_path), "train": {"lr": "1e-4"}}))
    cfg = config.load(path)
    assert cfg.train.lr == 1e-4
    config.save(cfg, tmp_path / "saved.yaml")
    assert config.load(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", "train.lrr: unknown key"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("train.lr=-1", "train.lr: must be > 0"),
        ("max_steps=0", "max_steps: must be >= 1"),
        ("train.schedule=wavy", "allowed values are ['constant', 'linear', 'cosine']"),
        ("mixer.name=nope", "mixer.name: unknown mixer 'nope'"),
        ("mixer.tau=2", "mixer.tau: unknown key"),
        ("loss.name=zzz", "loss.name: unknown loss"),
        ("datasets.zz.max_examples=3", "no entry named 'zz'"),
        ("datasets.a.max_examples=0", "datasets.a.max_examples: must be >= 1"),
        ("train.micro_batch_size=true", "expected int or null"),
        ("evals=[{name: e}]", "give exactly one of 'path' or 'from_dataset'"),
        ("evals=[{name: e, from_dataset: q}]", "unknown dataset 'q'"),
        ("datasets.1.name=a", "name 'a' is used twice"),
        ("noequals", "expected key=value"),
    ],
)
def test_errors_name_the_field(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        config.load(data=_base(tmp_path), overrides=[override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_required_and_empty(tmp_path):
    with pytest.raises(ConfigError, match="datasets: at least one"):
        config.load(data={})
    with pytest.raises(ConfigError, match=r"datasets\[x\].path: required key is missing"):
        config.load(data={"datasets": [{"name": "x"}]})
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "none.yaml")
