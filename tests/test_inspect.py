"""``mixtune inspect``: every example config, a file of each record format, the counts and shares
against hand-computed values, the supervised-span marks, no run directory, bad input; and the
progress lines of long silent work (tokenisation, DynaMiCS probes, ``mixtune report``)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from conftest import write_jsonl
from mixtune import cli, inspection
from mixtune.data.collate import collate

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
OFFLINE = {
    # The SmolLM2 example loads its tokenizer from a GGUF file of an optional package (~8 s):
    # pointed at the embedded model, as tests/test_smollm2.py does when the package is absent.
    "smollm2_lora.yaml": ["model.name_or_path=builtin", "model.gguf_file=null"],
}


def _inspect(capsys, *argv: str) -> dict:
    assert cli.main(["inspect", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _check_entry(e: dict, max_length: int) -> None:
    """What every inspected dataset or domain must satisfy, whatever its data."""
    n = e["lengths"]
    assert e["records"] >= e["selected"] >= e["selected"] - e["dropped"] > 0
    assert 0 < n["p50"] <= n["p90"] <= n["p99"] <= n["max"] <= max_length
    assert 0 < e["supervised_share"] <= 1 and 0 <= e["padding_share"] < 1
    for ex in e["examples"]:
        assert any(s["supervised"] for s in ex) and any(not s["supervised"] for s in ex)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_example_config(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the configs' relative output_dir would land here
    got = _inspect(capsys, str(path), *OFFLINE.get(path.name, []))
    raw = yaml.safe_load(path.read_text())
    if "stages" in raw:  # continual: every task, its domain, the safety buffer and domain
        want = {t["name"] for t in raw["stages"]}
        assert {e["name"] for e in got["entries"] if e["kind"] == "eval"} >= want | {"safety"}
        assert {e["name"] for e in got["entries"] if e["kind"] == "dataset"} >= want
    else:
        run = raw.get("run", raw)  # a plan config: its run
        names = [("dataset", d["name"]) for d in run["datasets"]]
        names += [("eval", e["name"]) for e in run.get("evals", [])]
        assert [(e["kind"], e["name"]) for e in got["entries"]] == names
    for e in got["entries"]:
        _check_entry(e, got["max_length"])
        assert e["format"] == "prompt_response"  # every built-in domain is prompt/response
    assert list(tmp_path.iterdir()) == []  # no run directory, nothing written


FORMATS = {
    "messages": [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        }
    ],
    "prompt_response": [{"prompt": "2+2?", "response": "4"}],
    "instruction": [{"instruction": "Add.", "input": "2+2", "output": "4"}],
    "text": [{"text": "two plus two is four"}],
}
RENDERED = {
    "messages": "<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n[[4<|end|>\n]]",
    "prompt_response": "<|user|>\n2+2?\n<|assistant|>\n[[4<|end|>\n]]",
    "instruction": "<|user|>\nAdd.\n\n2+2\n<|assistant|>\n[[4<|end|>\n]]",
    # raw text trains on every token but the first (never predicted), plus EOS
    "text": "t[[wo plus two is four<|end|>]]",
}


def _config(tmp_path, datasets, evals=(), **train) -> Path:
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": {"tokenizer": "byte", "config": {"model_type": "llama"}},
        "datasets": datasets,
        "evals": list(evals),
        "train": {"batch_size": 2, "max_length": 64, **train},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_file_of_each_format(fmt, tmp_path, capsys, monkeypatch):
    from mixtune.engine import build

    def no_weights(*a, **kw):
        raise AssertionError("mixtune inspect loaded a model")

    monkeypatch.setattr(build, "load_model", no_weights)
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", FORMATS[fmt] * 3)
    path = _config(tmp_path, [{"name": "d", "path": data}])
    (e,) = _inspect(capsys, str(path))["entries"]
    assert (e["format"], e["records"], e["selected"]) == (fmt, 3, 3)
    _check_entry(e, 64)
    # the table shows the marked example exactly, brackets when stdout is not a terminal
    assert cli.main(["inspect", str(path)]) == 0
    assert RENDERED[fmt] in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_counts_and_shares_by_hand(tmp_path, capsys):
    recs = [{"prompt": "ab", "response": "c" * n} for n in (1, 3, 5, 7)]
    recs.append({"prompt": "x" * 80, "response": "y"})  # prompt fills max_length: dropped
    recs.append({"prompt": "p", "response": "z" * 80})  # cut at max_length: truncated
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    path = _config(tmp_path, [{"name": "d", "path": data}])
    (d,) = _inspect(capsys, str(path), "--examples", "0")["entries"]
    # both long records are cut; the one with no response token left is also dropped
    assert (d["records"], d["selected"], d["dropped"], d["truncated"]) == (6, 6, 1, 2)
    assert d["examples"] == []
    # the byte tokenizer: one token per character; "<|user|>\nab\n<|assistant|>\n" + response
    # + "<|end|>\n" with the role and EOS markers one token each
    lengths = [1 + 1 + 2 + 1 + 1 + 1 + n + 1 + 1 for n in (1, 3, 5, 7)] + [64]
    supervised = [n + 2 for n in (1, 3, 5, 7)] + [64 - 6]  # response, EOS, newline
    assert d["lengths"]["max"] == 64 and d["lengths"]["p50"] == round(np.median(lengths))
    assert d["supervised_share"] == pytest.approx(sum(supervised) / sum(lengths))


def test_holdout_is_counted_on_both_sides(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", FORMATS["prompt_response"] * 10)
    evals = [{"name": "held", "from_dataset": "d", "holdout": 3, "batch_size": 1}]
    path = _config(tmp_path, [{"name": "d", "path": data}], evals)
    d, held = _inspect(capsys, str(path))["entries"]
    assert (d["kind"], d["records"], d["selected"]) == ("dataset", 10, 7)
    assert (held["kind"], held["records"], held["selected"]) == ("eval", 10, 3)
    assert held["source"] == "held out of d" and held["format"] == "prompt_response"
    assert held["padding_share"] == 0.0  # batches of one are never padded
    assert d["padding_share"] == 0.0  # equal lengths


def test_padding_share_is_what_the_collator_pads():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, 37)
    ids = [np.ones(n, np.int64) for n in lengths]
    for bs in (1, 4, 8, 37, 64):
        pad = real = 0
        for i in range(0, len(ids), bs):
            mask = collate(ids[i : i + bs], ids[i : i + bs], 0)["attention_mask"]
            pad += int((mask == 0).sum())
            real += int(mask.sum())
        assert inspection.padding_share(lengths, bs) == pytest.approx(pad / (pad + real))
    assert inspection.padding_share(np.array([2, 4]), 2) == 0.25


def test_colour_marks_in_a_terminal():
    runs = [("<|user|>\nhi\n<|assistant|>\n", False), ("yo<|end|>", True)]
    assert inspection.render(runs, color=False) == "<|user|>\nhi\n<|assistant|>\n[[yo<|end|>]]"
    coloured = inspection.render(runs, color=True)
    assert coloured == f"<|user|>\nhi\n<|assistant|>\n{inspection.COLOR}yo<|end|>\033[0m"


def test_colour_only_in_a_terminal_without_no_color(tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", FORMATS["prompt_response"])
    path = _config(tmp_path, [{"name": "d", "path": data}])
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert cli.main(["inspect", str(path)]) == 0
    assert f"{inspection.COLOR}4<|end|>\n{inspection.RESET}" in capsys.readouterr().out
    assert cli.main(["inspect", str(path), "--no-color"]) == 0
    assert RENDERED["prompt_response"] in capsys.readouterr().out
    monkeypatch.setenv("NO_COLOR", "1")
    assert cli.main(["inspect", str(path)]) == 0
    assert RENDERED["prompt_response"] in capsys.readouterr().out


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", FORMATS["text"])
    path = _config(tmp_path, [{"name": "d", "path": data}])
    assert cli.main(["inspect", str(path), "train.max_lenght=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mixtune: error: ") and "max_lenght" in err and "\n" not in err
    assert cli.main(["inspect", str(path), "--examples", "-1"]) == 2
    assert "--examples" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "?"}])
    assert cli.main(["inspect", str(_config(tmp_path, [{"name": "d", "path": bad}]))]) == 2
    assert "cannot detect the record format" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_tokenisation_progress_lines(tmp_path, capsys, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", FORMATS["prompt_response"] * 5)
    path = _config(tmp_path, [{"name": "d", "path": data}])
    with caplog.at_level(logging.INFO):
        _inspect(capsys, str(path))
    assert any(
        m.startswith("datasets.d: 5 examples tokenised in ") and m.endswith(" s")
        for m in caplog.messages
    )


def test_dynamics_says_which_dataset_it_probes(caplog):
    from mixtune.mixers.base import DomainInfo
    from mixtune.mixers.dynamics.slopes import from_probes

    names = ["math", "code", "chat"]
    ctx = SimpleNamespace(
        step=12,
        datasets=[SimpleNamespace(name=n) for n in names],
        probe=lambda j, c, b, **kw: {"x": {"loss": 1.0 - 0.1 * j}},
    )
    domains = [DomainInfo("x", "target", "loss", None)]
    with caplog.at_level(logging.INFO, logger="mixtune.mixers.dynamics"):
        S, _ = from_probes(ctx, domains, 3, {"x": {"loss": 1.0}}, np.array([1.0]), 4, 2, False)
    assert np.allclose(S, [[0.0, -0.025, -0.05]])
    assert [m for m in caplog.messages if "probing" in m] == [
        f"dynamics: step 12, probing {j + 1}/3: {n} (4 steps)" for j, n in enumerate(names)
    ]


def test_report_says_what_it_is_plotting(tmp_path, caplog):
    from mixtune.report import write_report

    recs = [
        {"step": s, "weights": {"a": 0.5, "b": 0.5}, "train": {"loss": 2.0 - s / 10}}
        for s in range(3)
    ]
    write_jsonl(tmp_path / "metrics.jsonl", recs)
    with caplog.at_level(logging.INFO, logger="mixtune.report"):
        index = write_report(tmp_path)
    assert index.is_file()
    assert caplog.messages[0].startswith("report: 3 records read; plotting")
    assert (
        caplog.messages[-1].startswith("report: ")
        and str(tmp_path / "report") in caplog.messages[-1]
    )


def test_a_streaming_dataset_is_described_by_its_first_block(tmp_path, capsys):
    from mixtune.data.streaming.dataset import CHUNK

    recs = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(CHUNK + 44)]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    path = _config(tmp_path, [{"name": "s", "path": data, "streaming": True}])
    (e,) = _inspect(capsys, str(path))["entries"]
    assert (e["records"], e["selected"], e["streamed"]) == (CHUNK + 44, CHUNK, True)
    _check_entry(e, 64)
    assert cli.main(["inspect", str(path), "--no-color"]) == 0
    assert "first block only" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
