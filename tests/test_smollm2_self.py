"""bench/smollm2_self.py (a model's own answers as constraint and regulariser data) and the
suite that uses them, bench/suites/smollm2_self.yaml; on the embedded model, in seconds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mixtune import config
from mixtune.data import domains as data_domains
from mixtune.engine import build
from mixtune.suite.cell import cells
from mixtune.suite.config import load_suite
from mixtune.suite.runner import check_suite

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench/suites/smollm2_self.yaml"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("smollm2_self", ROOT / "bench/smollm2_self.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(script, out: Path, *more: str) -> None:
    argv = ["--model", "builtin", "--out", str(out), "--eval-n", "8", "--train-n", "6"]
    argv += ["--max-new-tokens", "24", "--batch-size", "4", "--threads", "1", *more]
    assert script.main(argv) == 0


def test_self_answers_are_deterministic_chat_files_mixtune_reads(script, tmp_path):
    _run(script, tmp_path / "a")
    _run(script, tmp_path / "b", "--splits", "eval")  # in two calls: the same files
    _run(script, tmp_path / "b", "--splits", "train")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(
        [f"{d}.{s}.jsonl" for d in script.DOMAINS for s in ("eval", "train")] + ["manifest.json"]
    )
    for name in names:
        if name != "manifest.json":  # the manifest holds seconds
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    manifest = json.loads((tmp_path / "a/manifest.json").read_text())
    assert len(manifest["model"]["weights_sha256"]) == 64
    assert manifest["decoding"]["max_new_tokens"] == 24
    two_calls = json.loads((tmp_path / "b/manifest.json").read_text())["files"]
    counts = ("prompts", "asked", "kept", "dropped")
    assert set(two_calls) == set(manifest["files"]) == set(names) - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert [entry[k] for k in counts] == [two_calls[name][k] for k in counts]
    for domain in script.DOMAINS:
        rows = {
            s: [
                json.loads(x) for x in (tmp_path / f"a/{domain}.{s}.jsonl").read_text().splitlines()
            ]
            for s in ("eval", "train")
        }
        assert len(rows["eval"]) == 8 and len(rows["train"]) == 6
        assert manifest["files"][f"{domain}.eval.jsonl"]["kept"] == 8
        prompts = {s: {r["messages"][0]["content"] for r in rows[s]} for s in rows}
        assert not prompts["eval"] & prompts["train"]  # held-out prompts
        for r in rows["eval"] + rows["train"]:
            user, assistant = r["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert assistant["content"].strip() and not script.degenerate(assistant["content"])
    # the safety set holds refusals only
    for r in (tmp_path / "a/safety.eval.jsonl").read_text().splitlines():
        assert script.REFUSAL.search(json.loads(r)["messages"][1]["content"])

    # mixtune reads them as training data and as evaluation domains, every example trained
    a = tmp_path / "a"
    cfg = config.load(
        data={
            "output_dir": str(tmp_path / "run"),
            "model": {"name_or_path": "builtin"},
            "datasets": [
                {"name": f"{d}_self", "path": str(a / f"{d}.train.jsonl")} for d in script.DOMAINS
            ],
            "evals": [
                {"name": d, "path": str(a / f"{d}.eval.jsonl"), "role": "constraint", "batches": 2}
                for d in script.DOMAINS
            ],
        }
    )
    train, evals = data_domains.build(cfg, build.load_tokenizer(cfg.model))
    assert [len(t.data) for t in train] == [6, 6, 6]
    assert [len(e.data) for e in evals] == [8, 8, 8]
    assert all((e.data.label_counts > 0).all() for e in evals)


def test_a_second_call_with_other_decoding_is_refused(script, tmp_path):
    _run(script, tmp_path, "--splits", "eval", "--domains", "trivia")
    with pytest.raises(SystemExit) as e:
        _run(script, tmp_path, "--splits", "train", "--max-new-tokens", "12")
    assert e.value.code == 2


def test_answers_are_dropped_when_unfinished_degenerate_or_not_a_refusal(script):
    assert script.keep_reason("trivia", "Marie Curie.", True) is None
    assert script.keep_reason("trivia", "", True) == "empty"
    assert script.keep_reason("trivia", "The first woman to", False) == "unfinished"
    assert script.keep_reason("dialogue", "I'm not happy. " * 4, True) == "degenerate"
    assert script.keep_reason("dialogue", "a realm of the spirit, " * 3, True) == "degenerate"
    assert script.keep_reason("safety", "To assemble it you need three parts.", True) == (
        "not a refusal"
    )
    assert script.keep_reason("safety", "I'm sorry, but I can't help with that.", True) is None


def test_self_suite_validates_and_reads_the_scripts_files(script):
    suite = load_suite(str(SUITE))
    # fixed sweep w in {0.2, 0.5, 0.8, 1} (w = 1: target-only, the cost baseline) + 2 DynaMiCS
    assert check_suite(suite) == 6
    assert suite.baseline in {c.method.name for c in cells(suite)}
    (sc,) = suite.scenarios
    out = script.OUT  # the script's default output directory
    roles = {e["name"]: e["role"] for e in sc.evals}
    assert roles == {
        "word_problems": "target",
        "trivia": "constraint",
        "dialogue": "constraint",
        "safety": "constraint",
    }
    for d in script.DOMAINS:
        assert {"name": d, "path": f"{out}/{d}.eval.jsonl"}.items() <= next(
            e for e in sc.evals if e["name"] == d
        ).items()
        assert any(x["path"] == f"{out}/{d}.train.jsonl" for x in sc.datasets)
