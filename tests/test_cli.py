"""The CLI contract: bad input exits 2 with one line naming the problem, touching nothing."""

import hashlib
import importlib.util
import json

import pytest
import yaml

from conftest import write_jsonl
from mixtune import cli


def _tree(path):
    """Content hash and mtime of every file under ``path``."""
    return {
        str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def existing_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints/step-000004").mkdir(parents=True)
    (run / "checkpoints/step-000004/state.json").write_text('{"step": 4}')
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    (run / "config.yaml").write_text("datasets: [{name: add}, {name: rev}]\n")
    return run


def _case(name, raw, data_dir, tmp_path):
    """Mutate a valid config ``raw`` into bad input ``name``; returns (raw, overrides, expected)."""
    if name == "malformed_jsonl":
        (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{oops\n')
        raw["datasets"][0]["path"] = str(tmp_path / "bad.jsonl")
        return raw, [], "bad.jsonl:2: malformed JSON"
    if name == "missing_field":
        write_jsonl(tmp_path / "mf.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
        raw["datasets"][0].update(path=str(tmp_path / "mf.jsonl"), format="prompt_response")
        return raw, [], "record 2: missing field 'response'"
    if name == "empty_dataset":
        (tmp_path / "empty.jsonl").write_text("")
        raw["datasets"][1]["path"] = str(tmp_path / "empty.jsonl")
        raw["evals"] = raw["evals"][:1]
        return raw, [], "has no records; an empty dataset cannot be used"
    if name == "unknown_weight_name":
        raw["mixer"] = {"name": "fixed", "weights": {"add": 0.5, "math": 0.5}}
        return raw, [], "mixer.weights.math: unknown dataset name; datasets are ['add', 'rev']"
    if name == "negative_weight":
        raw["mixer"] = {"name": "fixed", "weights": {"add": 1.5, "rev": -0.5}}
        return raw, [], "finite and non-negative"
    if name == "nan_weight":
        raw["mixer"] = {"name": "fixed", "weights": {"add": float("nan"), "rev": 1.0}}
        return raw, [], "finite and non-negative"
    if name == "unknown_key":
        return raw, ["train.learning_rate=1e-4"], "train.learning_rate: unknown key"
    if name == "wrong_type":
        return raw, ["train.batch_size=eight"], "train.batch_size: expected an integer"
    if name == "missing_file":
        raw["datasets"][0]["path"] = str(tmp_path / "nope.jsonl")
        return raw, [], "file not found"
    if name == "eval_no_data":
        (tmp_path / "empty_eval.jsonl").write_text("\n")
        raw["evals"].append({"name": "ghost", "path": str(tmp_path / "empty_eval.jsonl")})
        return raw, [], "evals.ghost"
    if name == "max_length_short":
        return raw, ["train.max_length=4"], "raise train.max_length"
    if name == "bad_yaml":
        return "model: [unclosed\n", [], "not valid YAML"
    if name == "bad_batch_geometry":
        return raw, ["train.batch_size=6", "train.micro_batch_size=4"], "must be a multiple"
    if name == "unknown_mixer":
        return raw, ["mixer.name=doremi"], "unknown mixer 'doremi'"
    if name == "bad_model_path":
        raw["model"] = {"name_or_path": str(tmp_path / "no-model"), "tokenizer": "byte"}
        return raw, [], "model.name_or_path: no such directory"
    if name == "unknown_attention":
        return raw, ["model.attn_implementation=nonsense"], "model.attn_implementation: 'nonse"
    if name == "flash_attention_missing":
        if importlib.util.find_spec("flash_attn") is not None:
            pytest.skip("flash-attn is installed here")
        return raw, ["model.attn_implementation=flash_attention_2"], "pip install flash-attn"
    if name == "not_a_number_lr":
        return raw, ["train.lr=.nan"], "train.lr: expected a number, got NaN"
    raise AssertionError(name)


CASES = [
    "malformed_jsonl",
    "missing_field",
    "empty_dataset",
    "unknown_weight_name",
    "negative_weight",
    "nan_weight",
    "unknown_key",
    "wrong_type",
    "missing_file",
    "eval_no_data",
    "max_length_short",
    "bad_yaml",
    "bad_batch_geometry",
    "unknown_mixer",
    "bad_model_path",
    "not_a_number_lr",
    "unknown_attention",
    "flash_attention_missing",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_exits_2_and_leaves_run_dir_alone(
    name, make_config, data_dir, tmp_path, existing_run, capsys
):
    raw, overrides, expected = _case(name, make_config(), data_dir, tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    before = _tree(existing_run)
    code = cli.main(["train", str(path), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("mixtune: error: ") and expected in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)
    assert _tree(existing_run) == before


def test_train_then_eval_run_dir(make_config, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(make_config(max_steps=2)))
    assert cli.main(["train", str(path)]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"].endswith("step-000002") and set(out["eval"]) == {"add", "rev"}
    assert (tmp_path / "run/eval.json").is_file()


def test_unexpected_failure_exits_1_with_traceback_in_run_dir(
    make_config, tmp_path, capsys, monkeypatch
):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(make_config(max_steps=2)))
    from mixtune.engine import loop

    def boom(self, ds, ex):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(loop.Trainer, "train_step", boom)
    assert cli.main(["train", str(path)]) == 1
    assert "kaboom" in capsys.readouterr().err
    assert "RuntimeError: kaboom" in (tmp_path / "run/logs/error.log").read_text()
    # Another rank of a distributed run keeps its own traceback (rank 0's explains the failure).
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["train", str(path)]) == 1
    assert (tmp_path / "run/logs/error-rank1.log").is_file()
    assert "RuntimeError: kaboom" in (tmp_path / "run/logs/error.log").read_text()


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    assert "key=value" in capsys.readouterr().out


def test_overrides_may_follow_options():
    """``mixtune bench SUITE --check k=v``: overrides after an option are still overrides; an
    unknown option is still refused (exit 2)."""
    from mixtune.cli import _parse

    args = _parse(["bench", "quick", "--check", "seeds=[0,1]", "parallel=2"])
    assert args.check and args.suite == "quick"
    assert args.overrides == ["seeds=[0,1]", "parallel=2"]
    args = _parse(["bench", "quick", "seeds=[0]", "--check", "parallel=2"])
    assert args.overrides == ["seeds=[0]", "parallel=2"]
    with pytest.raises(SystemExit) as e:
        _parse(["bench", "quick", "--check", "--nope"])
    assert e.value.code == 2
