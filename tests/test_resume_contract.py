"""The resume contract: a resume continues exactly what the run recorded, or is refused.

A run records what its trajectory depends on (``run.json``) at its first start. A resume that
differs in any of it exits 2 with one line naming the keys (old -> new), before anything in the
run directory is written; the changes that cannot alter what is computed are made and recorded
in ``amendments.jsonl``, and ``config.yaml`` keeps what the run was started with. ``mixtune
eval`` and ``report`` only read a run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import addition_records, reverse_records, tiny_config, write_jsonl
from mixtune import cli, commands


def _tree(path: Path) -> dict:
    """Content hash and mtime of every file under ``path``, and every directory."""
    return {
        str(p.relative_to(path)): (
            (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            if p.is_file()
            else "dir"
        )
        for p in sorted(path.rglob("*"))
    }


def _train(config: Path, capsys, *overrides: str) -> tuple[int, list[str]]:
    """``mixtune train CONFIG OVERRIDES``: the exit code and the ``mixtune:`` lines it printed."""
    capsys.readouterr()
    code = cli.main(["train", str(config), *overrides])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [ln for ln in err.splitlines() if ln.startswith("mixtune:")]


def _refused(code: int, lines: list[str], *keys: str) -> str:
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("mixtune: error: "), lines
    for key in keys:
        assert f"{key} " in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4, and its config file."""
    root = tmp_path_factory.mktemp("contract")
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "add.jsonl", addition_records(200))
    write_jsonl(data / "rev.jsonl", reverse_records(120))
    raw = tiny_config(root, data, max_steps=4)
    raw["train"].update(save_every=2, keep_checkpoints=5)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["train", str(path)]) == 0
    return root, path


def _append_records(data: Path) -> None:
    write_jsonl(data / "add.jsonl", addition_records(200) + addition_records(20, seed=5))


def _edit_records(data: Path) -> None:
    recs = addition_records(200)
    for r in recs:
        r["response"] += " "
    write_jsonl(data / "add.jsonl", recs)


# name: (edit of the data files, overrides, keys the refusal names, keys it must not name)
REFUSED = {
    "records_added": (_append_records, [], ["datasets.add.examples", "datasets.add.digest"], []),
    "same_count_edit": (_edit_records, [], ["datasets.add.digest"], ["datasets.add.examples"]),
    "max_examples": (None, ["datasets.add.max_examples=100"], ["datasets.add.max_examples"], []),
    "lora_on": (None, ["model.lora.enabled=true", "model.lora.r=4"], ["model.lora.enabled"], []),
    "lr": (None, ["train.lr=1e-3"], ["train.lr"], ["seed"]),
    "seed": (None, ["seed=1"], ["seed"], ["train.lr"]),
    "mixer": (None, ["mixer.name=uniform"], ["mixer.name"], []),
    "mixer_options": (None, ["mixer.by=tokens"], ["mixer.by"], ["mixer.name"]),
    "schedule": (None, ["train.schedule=linear"], ["train.schedule"], []),
    "max_steps_up": (None, ["max_steps=6"], ["max_steps"], []),
    "max_steps_down": (None, ["max_steps=2"], ["max_steps"], []),
}


@pytest.mark.parametrize("name", REFUSED)
def test_changed_inputs_are_refused_before_anything_is_written(base, capsys, name):
    root, path = base
    edit, overrides, named, unnamed = REFUSED[name]
    before = _tree(root / "run")
    saved = {p: p.read_bytes() for p in (root / "data").iterdir()}
    try:
        if edit is not None:
            edit(root / "data")
        line = _refused(*_train(path, capsys, *overrides), *named)
    finally:
        for p, content in saved.items():
            p.write_bytes(content)
    assert all(f"{key} " not in line for key in unnamed), line
    assert "the settings and data it was started with, or use a new output_dir" in line
    assert _tree(root / "run") == before


def test_another_runs_checkpoint_must_match_its_data(base, capsys):
    root, path = base
    ckpt = root / "run" / "checkpoints" / "step-000002"
    fork = root / "fork"
    before = _tree(root / "run")
    line = _refused(
        *_train(
            path, capsys, f"output_dir={fork}", f"resume={ckpt}", "datasets.add.max_examples=100"
        ),
        "datasets.add.max_examples",
    )
    assert str(ckpt) in line and not fork.exists()
    # A checkpoint whose run has no record (older runs): its sampler still names the data.
    bare = root / "bare" / "step-000002"
    shutil.copytree(ckpt, bare)
    _refused(
        *_train(
            path, capsys, f"output_dir={fork}", f"resume={bare}", "datasets.add.max_examples=100"
        )
    )
    assert not fork.exists() and _tree(root / "run") == before
    # The same data: the new run directory continues from it and records where it started.
    code, lines = _train(path, capsys, f"output_dir={fork}", f"resume={ckpt}")
    assert code == 0, lines
    assert json.loads((fork / "run.json").read_text())["since_step"] == 2
    assert json.loads((fork / "summary.json").read_text())["steps"] == 4
    assert _tree(root / "run") == before


def test_a_finished_run_without_checkpoints_is_not_overwritten(base, capsys):
    root, path = base
    run = root / "finished"
    shutil.copytree(root / "run", run)
    shutil.rmtree(run / "checkpoints")
    before = _tree(run)
    for resume in ("auto", "never"):
        line = _refused(*_train(path, capsys, f"output_dir={run}", f"resume={resume}"))
        assert "finished run" in line and "use a new output_dir" in line
    assert _tree(run) == before


def test_metrics_only_a_cut_short_last_line_is_dropped(base, capsys):
    root, path = base
    run = root / "metrics"
    shutil.copytree(root / "run", run)
    text = (run / "metrics.jsonl").read_text()
    lines = text.splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:9], *lines[2:]]) + "\n")
    before = _tree(run)
    line = _refused(*_train(path, capsys, f"output_dir={run}"))
    assert "metrics.jsonl:2: not a JSON record" in line
    assert _tree(run) == before
    assert cli.main(["report", str(run)]) == 2

    (run / "metrics.jsonl").write_text(text + lines[-1][:9])  # a kill mid-append
    capsys.readouterr()
    assert cli.main(["report", str(run)]) == 0
    code, out = _train(path, capsys, f"output_dir={run}")
    assert code == 0, out
    assert (run / "metrics.jsonl").read_text() == text


def test_safe_changes_resume_and_are_recorded(base, capsys):
    root, path = base
    run = root / "amended"
    shutil.copytree(root / "run", run)
    started = {n: (run / n).read_bytes() for n in ("config.yaml", "run.json")}
    changes = ["train.log_every=1", "train.eval_every=2", "train.keep_checkpoints=3"]
    code, lines = _train(path, capsys, f"output_dir={run}", *changes)
    assert code == 0, lines
    amendments = [json.loads(ln) for ln in (run / "amendments.jsonl").read_text().splitlines()]
    assert amendments == [
        {"step": 4, "key": "train.eval_every", "old": 4, "new": 2},
        {"step": 4, "key": "train.keep_checkpoints", "old": 5, "new": 3},
        {"step": 4, "key": "train.log_every", "old": 2, "new": 1},
    ]
    assert {n: (run / n).read_bytes() for n in started} == started
    # The same command again changes nothing more.
    code, lines = _train(path, capsys, f"output_dir={run}", *changes)
    assert code == 0 and len((run / "amendments.jsonl").read_text().splitlines()) == 3


def test_a_setting_the_record_predates_counts_while_it_keeps_its_default(base, capsys):
    root, path = base
    run = root / "older"
    shutil.copytree(root / "run", run)
    record = json.loads((run / "run.json").read_text())
    del record["fingerprint"]["train.warmup_ratio"]  # as if recorded before the setting existed
    (run / "run.json").write_text(json.dumps(record))
    before = _tree(run)
    _refused(
        *_train(path, capsys, f"output_dir={run}", "train.warmup_ratio=0.5"), "train.warmup_ratio"
    )
    assert _tree(run) == before
    code, lines = _train(path, capsys, f"output_dir={run}")
    assert code == 0, lines


def test_a_run_without_a_record_is_checked_against_its_config(base, capsys):
    root, path = base
    run = root / "unrecorded"
    shutil.copytree(root / "run", run)
    (run / "run.json").unlink()  # a run started before run.json existed
    before = _tree(run)
    _refused(*_train(path, capsys, f"output_dir={run}", "train.lr=1e-3"), "train.lr")
    assert _tree(run) == before
    code, lines = _train(path, capsys, f"output_dir={run}")
    assert code == 0, lines
    assert json.loads((run / "run.json").read_text())["since_step"] == 4


def _params(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def test_raising_max_steps_with_a_constant_schedule_continues_exactly(
    make_config, tmp_path, capsys
):
    raw = make_config(max_steps=2)
    raw["train"].update(schedule="constant", eval_every=0)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert _train(path, capsys)[0] == 0
    assert _train(path, capsys, "max_steps=4")[0] == 0
    assert _train(path, capsys, f"output_dir={ref}", "max_steps=4")[0] == 0
    amendments = [json.loads(ln) for ln in (run / "amendments.jsonl").read_text().splitlines()]
    assert amendments == [{"step": 2, "key": "max_steps", "old": 2, "new": 4}]
    assert yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 2
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    a, b = _params(run), _params(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_unchanged_resume_is_exact_and_records_nothing(make_config, tmp_path, capsys):
    from mixtune import config
    from mixtune.engine.loop import Trainer
    from mixtune.engine.rundir import read_metrics

    raw = make_config(max_steps=4)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    run, full = tmp_path / "run", tmp_path / "full"
    Trainer(config.load(path)).run(stop_after=2)
    started = {n: (run / n).read_bytes() for n in ("config.yaml", "run.json")}
    assert _train(path, capsys)[0] == 0
    assert _train(path, capsys, f"output_dir={full}")[0] == 0
    assert {n: (run / n).read_bytes() for n in started} == started
    assert not (run / "amendments.jsonl").exists()

    def strip(records):
        return [{k: v for k, v in r.items() if k != "time"} for r in records]

    assert strip(read_metrics(run)) == strip(read_metrics(full))
    a, b = _params(run), _params(full)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_and_report_only_read_the_run_dir(base, capsys, monkeypatch):
    root, _ = base
    run = root / "run"
    before = _tree(run)
    paths = [run, *run.rglob("*")]
    modes = {p: p.stat().st_mode for p in paths}
    for p in paths:
        p.chmod(modes[p] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    if os.geteuid() == 0:  # file modes do not bind root: the commands' own check must
        monkeypatch.setattr(commands, "_writable", lambda p: False)
    try:
        capsys.readouterr()
        assert cli.main(["eval", str(run), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["source"].endswith("step-000004") and set(out["eval"]) == {"add", "rev"}
        assert cli.main(["report", str(run)]) == 0
        page = Path(capsys.readouterr().out.strip().splitlines()[-1])
        assert page.is_file() and not page.is_relative_to(run)
    finally:
        for p in reversed(paths):
            p.chmod(modes[p])
    assert _tree(run) == before


def test_raising_max_steps_is_refused_when_a_method_depends_on_it(make_config, tmp_path):
    """A constant LR does not stretch, but a method whose decisions scale with the run length
    would: methods declare it (capability fixed_length), the resume names no method."""
    raw = make_config(max_steps=4)
    raw["train"]["schedule"] = "constant"
    raw["mixer"] = {"name": "dynamixsft", "update_every": 2}
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(raw))
    assert cli.main(["train", str(path)]) == 0
    assert cli.main(["train", str(path), "max_steps=6"]) == 0  # its updates do not scale
    raw = make_config(max_steps=4, output_dir=str(tmp_path / "scaled"))
    raw["train"]["schedule"] = "constant"
    raw["mixer"] = {"name": "dynamics", "c_max": 2, "probe_batches": 1}
    for e, role in zip(raw["evals"], ("target", "constraint")):
        e.update(role=role, accuracy=False)
    path.write_text(json.dumps(raw))
    assert cli.main(["train", str(path)]) == 0
    before = _tree(tmp_path / "scaled")
    assert cli.main(["train", str(path), "max_steps=40"]) == 2
    assert _tree(tmp_path / "scaled") == before


# ----------------------------------------------------------------------------------------------
# Content, not only settings: the base model's files and every byte a stream reads.


def _save_model(where: Path, seed: int) -> None:
    """A tiny Llama with the byte tokenizer saved as a local model directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import TINY_MODEL
    from mixtune.data.bytetok import byte_tokenizer

    tok = byte_tokenizer()
    spec = dict(TINY_MODEL)
    hf_cfg = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), **spec)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(where)
    tok.save_pretrained(where)


def test_a_model_replaced_in_place_is_refused_and_a_touched_one_is_not(
    make_config, tmp_path, capsys
):
    model = tmp_path / "base-model"
    _save_model(model, seed=0)
    raw = make_config(max_steps=2)
    raw["model"] = {"name_or_path": str(model)}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert _train(path, capsys)[0] == 0
    run = tmp_path / "run"
    recorded = json.loads((run / "run.json").read_text())["fingerprint"]["model.content"]
    assert recorded.startswith("sha256:")
    weights = model / "model.safetensors"
    original = weights.read_bytes()
    before = _tree(run)

    _save_model(model, seed=1)  # other weights, same path, same size
    assert weights.stat().st_size == len(original) and weights.read_bytes() != original
    line = _refused(*_train(path, capsys), "model.content")
    assert f"model.content {recorded} -> sha256:" in line
    assert _tree(run) == before

    weights.write_bytes(original)  # the same bytes again, with a new mtime: still the model
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    code, lines = _train(path, capsys)
    assert code == 0, lines
    assert not (run / "amendments.jsonl").exists()


def test_a_record_without_model_content_resumes_and_records_it(make_config, tmp_path, capsys):
    """Runs recorded before the model's content was: accepted with a notice, then checked."""
    model = tmp_path / "base-model"
    _save_model(model, seed=0)
    raw = make_config(max_steps=2)
    raw["model"] = {"name_or_path": str(model)}
    raw["train"]["schedule"] = "constant"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert _train(path, capsys)[0] == 0
    run = tmp_path / "run"
    record = json.loads((run / "run.json").read_text())
    content = record["fingerprint"].pop("model.content")
    (run / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    code, lines = _train(path, capsys, "max_steps=3")
    assert code == 0, lines
    amendments = [json.loads(ln) for ln in (run / "amendments.jsonl").read_text().splitlines()]
    assert {"step": 2, "key": "model.content", "old": "(absent)", "new": content} in amendments
    # From now on the content is checked.
    _save_model(model, seed=1)
    before = _tree(run)
    _refused(*_train(path, capsys, "max_steps=4"), "model.content")
    assert _tree(run) == before


def test_a_stream_edited_past_its_first_block_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    recs = addition_records(700)  # a stream reads 256 records per block without a buffer
    write_jsonl(data / "add.jsonl", recs)
    write_jsonl(data / "rev.jsonl", reverse_records(120))
    raw = tiny_config(tmp_path, data, max_steps=2)
    raw["datasets"][0]["streaming"] = True
    raw["evals"] = []
    raw["train"]["eval_every"] = 0
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert _train(path, capsys)[0] == 0
    run = tmp_path / "run"
    before = _tree(run)
    recs[600]["response"] = recs[600]["response"] + "0"  # far past the first block
    write_jsonl(data / "add.jsonl", recs)
    line = _refused(*_train(path, capsys), "datasets.add.files")
    assert "datasets.add.digest" not in line and "datasets.add.examples" not in line
    assert _tree(run) == before


def test_file_hashes_are_cached_by_path_size_and_times(tmp_path, monkeypatch):
    from mixtune import filehash

    monkeypatch.setenv("MIXTUNE_CACHE_DIR", str(tmp_path / "cache"))
    reads = []
    real = filehash._read_hash
    monkeypatch.setattr(filehash, "_read_hash", lambda p: reads.append(p) or real(p))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x" * 3_000_000)
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert filehash.sha256(f) == want and filehash.sha256(f) == want
    assert len(reads) == 1  # the second time from the cache
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert filehash.sha256(f) == want and len(reads) == 2  # touched: hashed again, same bytes
    f.write_bytes(b"y" * 3_000_000)
    assert filehash.sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    monkeypatch.setenv("MIXTUNE_CACHE_DIR", "off")
    assert filehash.sha256(f) == filehash.sha256(f) and len(reads) == 5


def test_a_record_with_per_example_digests_is_still_checked_exactly(base, capsys):
    """Runs recorded before examples_digest hold tokenize.digest values: the resume computes
    those (once) and compares like with like; the new digests are then recorded."""
    from mixtune import config
    from mixtune.data import domains
    from mixtune.data.bytetok import byte_tokenizer
    from mixtune.data.tokenize import digest

    root, path = base
    run = root / "legacy-digests"
    shutil.copytree(root / "run", run)
    train, evals = domains.build(config.load(path), byte_tokenizer())
    record = json.loads((run / "run.json").read_text())
    fp = record["fingerprint"]
    for where, t in [
        *((f"datasets.{t.name}", t) for t in train),
        *((f"evals.{d.name}", d) for d in evals),
    ]:
        assert fp[f"{where}.digest"].startswith("v2:")
        fp[f"{where}.digest"] = digest(t.data.input_ids, t.data.labels, t.data.answers)
    (run / "run.json").write_text(json.dumps(record))
    before = _tree(run)
    saved = (root / "data" / "add.jsonl").read_bytes()
    try:
        _edit_records(root / "data")
        _refused(*_train(path, capsys, f"output_dir={run}"), "datasets.add.digest")
    finally:
        (root / "data" / "add.jsonl").write_bytes(saved)
    assert _tree(run) == before
    code, lines = _train(path, capsys, f"output_dir={run}")
    assert code == 0, lines
    amended = [json.loads(ln) for ln in (run / "amendments.jsonl").read_text().splitlines()]
    assert {a["key"] for a in amended} == {
        "datasets.add.digest",
        "datasets.rev.digest",
        "evals.add.digest",
        "evals.rev.digest",
    }
    assert all(a["new"].startswith("v2:") and not a["old"].startswith("v2:") for a in amended)


def test_examples_digest_sees_every_part_of_an_example():
    import numpy as np

    from mixtune.engine.content import examples_digest

    ids = [np.array([1, 2, 3]), np.array([4, 5])]
    labels = [np.array([-100, 2, 3]), np.array([-100, 5])]
    base = examples_digest(ids, labels, ["a", None])
    assert base.startswith("v2:") and base == examples_digest(ids, labels, ["a", None])
    variants = {
        "token": ([np.array([1, 2, 3]), np.array([4, 6])], labels, ["a", None]),
        "label": (ids, [np.array([1, 2, 3]), np.array([-100, 5])], ["a", None]),
        "answer": (ids, labels, ["a", ""]),
        "boundary": ([np.array([1, 2]), np.array([3, 4, 5])], labels, ["a", None]),
        "order": (ids[::-1], labels[::-1], [None, "a"]),
        "one less": (ids[:1], labels[:1], ["a"]),
    }
    for name, args in variants.items():
        assert examples_digest(*args) != base, name
