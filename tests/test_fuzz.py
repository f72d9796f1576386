"""Fuzzing the CLI's input: configs and data files, malformed, mistyped, huge, odd unicode,
empty, duplicated, missing, or a directory where a file belongs.

Every case goes through ``cli.main(["train", CONFIG, *overrides])`` in-process and must either
run (exit 0) or exit 2 with one line ``mixtune: error: ...`` naming the problem and no
traceback. Nothing outside the case's own output_dir may change; cases that fail before
training point output_dir at a pre-existing run, which must stay byte-identical. Cases are
generated deterministically (seeded); those that train run 1-2 steps of a tiny model.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import TINY_MODEL, addition_records, reverse_records, write_jsonl
from mixtune import cli

OK = "ok"


@dataclass
class Case:
    name: str
    expect: str  # OK, or a substring of the one-line error
    overrides: list = field(default_factory=list)
    text: object = None  # the config file's content, or callable(raw) -> it (default: YAML)
    edit: object = None  # callable(raw dict) -> None, mutating the base config
    trains: bool = False  # fails only after training started: gets a fresh output_dir
    config_path: str | None = None  # pass this path as the config instead of writing one


def _base(root: Path) -> dict:
    d = root / "data"
    return {
        "output_dir": str(root / "existing"),
        "seed": 0,
        "max_steps": 1,
        "progress": False,
        "model": {"tokenizer": "byte", "config": dict(TINY_MODEL)},
        "datasets": [
            {"name": "add", "path": str(d / "add.jsonl")},
            {"name": "rev", "path": str(d / "rev.jsonl")},
        ],
        "evals": [
            {
                "name": "add",
                "from_dataset": "add",
                "holdout": 4,
                "batches": 1,
                "batch_size": 4,
                "accuracy": False,
            }
        ],
        "train": {"batch_size": 4, "max_length": 48, "eval_every": 0, "log_every": 1},
    }


def _data(root: Path, name: str, content: str | bytes) -> str:
    path = root / "data" / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _set_path(path: str, i: int = 0):
    def edit(raw):
        raw["datasets"][i]["path"] = path

    return edit


def _nested_aliases(levels: int) -> str:
    """One YAML value of 10**levels leaves written in a few hundred characters."""
    text = "[" + ", ".join(["1"] * 10) + "]"
    for i in range(levels - 1):
        text = f"[&l{i} {text}" + f", *l{i}" * 9 + "]"
    return text


def _cases(root: Path) -> list[Case]:  # noqa: C901  (one flat list is the clearest form)
    rng = random.Random(20240611)
    base_yaml = yaml.safe_dump(_base(root))
    cases = [
        # --- YAML ---------------------------------------------------------------------------
        Case("yaml_unclosed", "not valid YAML", text="model: [unclosed\n"),
        Case("yaml_tab_indent", "not valid YAML", text="train:\n\tlr: 1\n"),
        Case("yaml_top_list", "the top level must be a mapping", text="- a\n- b\n"),
        Case("yaml_top_scalar", "the top level must be a mapping", text="hello\n"),
        Case("yaml_empty", "datasets: at least one training dataset", text=""),
        Case("yaml_nul_char", "not valid YAML", text=base_yaml[:40] + "\0" + base_yaml[40:]),
        Case("yaml_binary", "not UTF-8", text=b"\xff" + rng.randbytes(63)),
        Case("yaml_bom", OK, text=lambda raw: b"\xef\xbb\xbf" + yaml.safe_dump(raw).encode()),
        Case(
            "yaml_alias_bomb",
            "more than 100,000 values once YAML aliases",
            text=lambda raw: (
                "".join(
                    f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}" if i else "lol"] * 9) + "]\n"
                    for i in range(10)
                )
                + yaml.safe_dump(raw)
                + "mixer: {name: uniform, x: *a9}\n"
            ),
        ),
        Case(
            "yaml_alias_in_itself",
            "nested more than 64 levels deep",
            text=lambda raw: yaml.safe_dump(raw) + "mixer: &m {name: uniform, x: *m}\n",
        ),
        Case(
            "override_alias_bomb",
            "more than 100,000 values",
            overrides=["mixer.name=uniform", "mixer.x=" + _nested_aliases(6)],
        ),
        Case("yaml_is_dir", "is a directory", config_path=str(root / "data")),
        Case("yaml_missing", "config file not found", config_path=str(root / "nope.yaml")),
        Case("override_no_equals", "expected key=value", overrides=["train.lr"]),
        Case("override_not_section", "is not a section", overrides=["seed.x=1"]),
        Case("override_bad_index", "index out of range", overrides=["datasets.7.name=x"]),
    ]
    # --- wrong types ----------------------------------------------------------------------
    for override, message in [
        ("train.batch_size=eight", "train.batch_size: expected an integer"),
        ("train.batch_size=[8]", "train.batch_size: expected an integer"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("train.lr=true", "train.lr: expected a number"),
        ("max_steps=2.5", "max_steps: expected int or null"),
        ("seed=x", "seed: expected an integer"),
        ("progress=maybe", "progress: expected true or false"),
        ("datasets=add.jsonl", "datasets: expected a list"),
        ("datasets.0=hello", "datasets[0]: expected a mapping"),
        ("model=[1]", "model: expected a mapping"),
        ("model.config=llama", "model.config: expected dict or null"),
        ("evals.0.role=5", "evals[add].role: got 5; allowed values"),
        ("train.betas=[0.9]", "train.betas: expected 2 values"),
        ("mixer=5", "mixer: expected a mapping with a 'name'"),
        ("mixer.name=5", "mixer.name: required, a string"),
        ("resume=5", "resume: expected a string"),
        ("report_to=[nope]", "report_to: entries must be tensorboard or wandb"),
        ("output_dir=[a]", "output_dir: expected a string"),
        ("train={a: 1}", "train.a: unknown key"),
        ("datasets.add.max_examples=-3", "datasets.add.max_examples: must be >= 1"),
        ("evals.add.holdout=.inf", "evals.add.holdout: must be finite and > 0"),
        ("train.nonfinite=ignore", "train.nonfinite: got 'ignore'"),
    ]:
        cases.append(Case(f"type:{override}", message, overrides=[override]))
    # --- huge values ----------------------------------------------------------------------
    cases += [
        Case(
            "huge_max_steps_until_exhausted",
            OK,
            overrides=[
                "max_steps=1000000000000",
                "datasets.add.repeat=false",
                "datasets.rev.repeat=false",
                "datasets.add.max_examples=6",
                "datasets.rev.max_examples=6",
            ],
        ),
        Case(
            "huge_batch",
            "train.batch_size: must be <= 1048576",
            overrides=["train.batch_size=1000000000"],
        ),
        Case(
            "huge_micro_batch",
            "must be a multiple of micro_batch_size",
            overrides=["train.micro_batch_size=1000000000000"],
        ),
        Case(
            "huge_lr_one_step",
            "parameters became non-finite by step 1",
            overrides=["train.lr=1e308"],
            trains=True,
        ),
        Case(
            "huge_lr_two_steps",
            "non-finite loss/gradient at step 2",
            overrides=["train.lr=1e308", "max_steps=2"],
            trains=True,
        ),
        Case(
            "huge_lr_skip",
            "2 consecutive non-finite steps",
            overrides=[
                "train.lr=1e308",
                "max_steps=5",
                "train.nonfinite=skip",
                "train.max_nonfinite=2",
            ],
            trains=True,
        ),
        Case(
            "huge_weight_decay",
            "parameters became non-finite",
            overrides=["train.weight_decay=1e308"],
            trains=True,
        ),
        Case("inf_lr", "train.lr: must be > 0 and finite", overrides=["train.lr=1e400"]),
        Case(
            "zero_adam_eps",
            "train.adam_eps: must be finite and > 0",
            overrides=["train.adam_eps=0"],
        ),
        Case("huge_seed", "seed: must be in [0, 2**63)", overrides=[f"seed={2**70}"]),
        Case("negative_seed", "seed: must be in [0, 2**63)", overrides=["seed=-1"]),
        Case(
            "huge_holdout",
            "leaves nothing to train on",
            overrides=["evals.add.holdout=1000000000000"],
        ),
        Case(
            "huge_layers",
            "model.config.num_hidden_layers: 10000000 is above",
            overrides=["model.config.num_hidden_layers=10000000"],
        ),
        Case(
            "model_beyond_memory",
            "more than the",
            overrides=[
                "model.config.hidden_size=65536",
                "model.config.num_hidden_layers=512",
                "model.config.intermediate_size=262144",
            ],
        ),
        Case(
            "huge_lora_rank",
            "model.lora.r: must be in [1, 65536]",
            overrides=["model.lora.enabled=true", "model.lora.r=1000000000"],
        ),
        Case(
            "lora_rank_above_hidden",
            "above the model's hidden size",
            overrides=["model.lora.enabled=true", "model.lora.r=4096"],
        ),
        Case(
            "huge_max_new_tokens",
            "evals.add.max_new_tokens: must be in [1, 4096]",
            overrides=["evals.add.max_new_tokens=1000000000"],
        ),
        Case(
            "huge_but_valid",
            OK,
            overrides=[
                "train.max_length=1000000000000",
                "train.warmup_steps=1000000000000",
                "train.keep_checkpoints=1000000000000",
                "train.log_every=1000000000000",
                "datasets.add.max_examples=1000000000000",
                "evals.add.batches=1000000000000",
                "train.max_grad_norm=1e308",
            ],
        ),
    ]
    # --- odd unicode ----------------------------------------------------------------------
    bad_names = ["📚data", "a\u200fb", "a\0b", "a b", "", "zwj\u200d", "e\u0301"]
    for bad in rng.sample(bad_names, 5):
        cases.append(
            Case(
                f"name:{bad!r}",
                "must be non-empty letters, digits",
                overrides=[f"datasets.0.name={json.dumps(bad, ensure_ascii=False)}"],
            )
        )
    cases.append(Case("eval_name_emoji", "evals[].name", overrides=['evals.0.name="🎯"']))
    uni = ["נתונים", "بيانات", "数据", "данные"]
    a, b = rng.sample(uni, 2)

    def unicode_names(raw):
        raw["datasets"][0]["name"], raw["datasets"][1]["name"] = a, b
        raw["evals"][0].update(name=b, from_dataset=a)
        raw["output_dir"] = str(root / "out" / "رن📚")

    cases.append(Case("unicode_names_rtl_cjk", OK, edit=unicode_names))
    odd_text = [
        {"prompt": "שלום 👋 \u200f" + "\u0301" * 3, "response": "مرحبا 🌍"},
        {"prompt": "nul \0 inside", "response": "tab\tand\u2028sep"},
    ] * 8
    cases.append(
        Case(
            "unicode_content",
            OK,
            edit=_set_path(write_jsonl(root / "data" / "données📚.jsonl", odd_text)),
        )
    )
    cases.append(
        Case(
            "lone_surrogate",
            "field 'response' is not valid Unicode",
            edit=_set_path(_data(root, "sur.jsonl", '{"prompt": "a", "response": "b\\ud800"}\n')),
        )
    )
    cases.append(
        Case("nul_in_path", "contains a NUL character", overrides=["datasets.add.path=a\0b"])
    )
    cases.append(
        Case(
            "nul_in_output_dir",
            "output_dir: must be a non-empty path without NUL",
            overrides=['output_dir="run\\0x"'],
        )
    )
    cases.append(
        Case(
            "empty_output_dir", "output_dir: must be a non-empty path", overrides=['output_dir=""']
        )
    )
    # --- malformed JSONL (seeded corruptions of a valid file) -----------------------------
    lines = [json.dumps(r) for r in addition_records(10, seed=5)]
    kinds = [
        "truncate",
        "array",
        "utf8",
        "control",
        "null",
        "int_field",
        "drop_field",
        "garbage_tail",
    ]
    for n, kind in enumerate(kinds):
        i = rng.randrange(len(lines))
        body = [ln.encode() for ln in lines]
        rec = json.loads(lines[i])
        expect = f"bad{n}.jsonl:{i + 1}: malformed JSON"
        if kind == "truncate":
            body[i] = body[i][: rng.randrange(1, len(body[i]) - 1)]
        elif kind == "array":
            body[i], expect = b"[1, 2]", f"bad{n}.jsonl:{i + 1}: expected a JSON object, got list"
        elif kind == "utf8":
            body[i] = body[i][:5] + b"\xc3\x28" + body[i][5:]
            expect = f"bad{n}.jsonl:{i + 1}: not UTF-8 text"
        elif kind == "control":
            body[i] = body[i].replace(b'": "', b'": "\x00', 1)
        elif kind == "null":
            body[i], expect = b"null", f"bad{n}.jsonl:{i + 1}: expected a JSON object, got None"
        elif kind == "int_field":
            rec["prompt"] = 5
            body[i] = json.dumps(rec).encode()
            expect = f"record {i + 1}: field 'prompt' must be a string, got int"
        elif kind == "drop_field":
            del rec["response"]
            body[i] = json.dumps(rec).encode()
            expect = (
                "cannot detect the record format"
                if i == 0
                else f"record {i + 1}: missing field 'response'"
            )
        else:
            body[i] += b" trailing"
        path = _data(root, f"bad{n}.jsonl", b"\n".join(body) + b"\n")
        cases.append(Case(f"jsonl:{kind}@{i + 1}", expect, edit=_set_path(path, n % 2)))
    # --- other file kinds, empty files, empty domains -------------------------------------
    for name, content, expect in [
        ("bad.jsonl.gz", b"not gzip at all", "cannot read: Not a gzipped file"),
        ("two.json", '{"a": [], "b": []}', "expected a list of records"),
        ("bad.json", "[{", "malformed JSON"),
        ("bad.parquet", b"PAR1 nonsense", "cannot read Parquet"),
        ("empty.csv", "", "empty CSV"),
        ("header.csv", "prompt,response\n", "has no records"),
        ("empty.jsonl", "", "has no records"),
        ("blank.jsonl", "\n  \n\t\n", "has no records"),
        ("bom.jsonl", b"\xef\xbb\xbf" + "\n".join(lines).encode(), OK),
        ("bom.csv", b"\xef\xbb\xbfprompt,response\n" + b"1+1=,2\n" * 12, OK),
        (
            "messages.jsonl",
            '{"messages": [{"role": "robot", "content": "x"}]}\n',
            "role must be one of",
        ),
        (
            "mixed.jsonl",
            '{"text": "a"}\n{"prompt": "b", "response": "c"}\n',
            "record 2 looks like prompt+response, but the file's first record is text",
        ),
        (
            "prompt_only.jsonl",
            '{"prompt": "' + "x" * 200 + '", "response": "y"}\n',
            "raise train.max_length",
        ),
    ]:
        cases.append(Case(f"file:{name}", expect, edit=_set_path(_data(root, name, content), 1)))
    cases.append(
        Case(
            "eval_empty_file",
            "evals.ghost",
            edit=lambda raw: raw["evals"].append(
                {"name": "ghost", "path": _data(root, "ghost.jsonl", "")}
            ),
        )
    )
    cases.append(
        Case("no_datasets", "datasets: at least one training dataset", overrides=["datasets=[]"])
    )
    cases.append(Case("no_evals", OK, overrides=["evals=[]"]))
    cases.append(
        Case("max_examples_zero", "must be >= 1", overrides=["datasets.add.max_examples=0"])
    )
    # --- duplicates and missing fields ----------------------------------------------------
    cases += [
        Case(
            "dup_dataset",
            "datasets: name 'add' is used twice",
            edit=lambda raw: raw["datasets"].append(dict(raw["datasets"][0])),
        ),
        Case(
            "dup_eval",
            "evals: name 'add' is used twice",
            edit=lambda raw: raw["evals"].append(dict(raw["evals"][0])),
        ),
        Case("case_distinct_names", OK, overrides=["datasets.rev.name=Add"]),
        Case(
            "missing_path",
            "datasets[add].path: required key is missing",
            edit=lambda raw: raw["datasets"][0].pop("path"),
        ),
        Case(
            "missing_name",
            "datasets[0].name: required key is missing",
            edit=lambda raw: raw["datasets"][0].pop("name"),
        ),
        Case(
            "eval_no_source",
            "give exactly one of 'path' or 'from_dataset'",
            edit=lambda raw: raw["evals"][0].pop("from_dataset"),
        ),
        Case(
            "eval_unknown_dataset",
            "unknown dataset 'nope'",
            overrides=["evals.add.from_dataset=nope"],
        ),
    ]
    # --- directories where files belong, and the existing run -----------------------------
    (root / "emptydir").mkdir(exist_ok=True)
    (root / "dir.jsonl").mkdir(exist_ok=True)
    cases += [
        Case(
            "dataset_is_empty_dir", "is an empty directory", edit=_set_path(str(root / "emptydir"))
        ),
        Case(
            "dataset_dir_named_jsonl",
            "is an empty directory",
            edit=_set_path(str(root / "dir.jsonl")),
        ),
        Case(
            "output_dir_is_file",
            "is a file, not a directory",
            overrides=[f"output_dir={root / 'data' / 'add.jsonl'}"],
        ),
        Case(
            "output_dir_under_file",
            "is a file, not a directory",
            overrides=[f"output_dir={root / 'data' / 'add.jsonl' / 'run'}"],
        ),
        Case(
            "existing_other_datasets",
            "holds a run over datasets",
            overrides=["datasets.rev.name=other"],
        ),
        Case("existing_resume_never", "resume=never but", overrides=["resume=never"]),
        Case(
            "resume_bad_path",
            "is not a complete checkpoint directory",
            overrides=[f"resume={root / 'emptydir'}"],
        ),
    ]
    return cases


def _tree(path: Path) -> dict:
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = (
            (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            if p.is_file()
            else "dir"
        )
    return out


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "data").mkdir()
    write_jsonl(root / "data" / "add.jsonl", addition_records(40))
    write_jsonl(root / "data" / "rev.jsonl", reverse_records(30))
    (root / "out").mkdir()
    cases = _cases(root)
    # A real finished run (2 steps, a checkpoint each) that failing cases point at.
    path = root / "existing.yaml"
    path.write_text(
        yaml.safe_dump(
            {**_base(root), "max_steps": 2, "train": {**_base(root)["train"], "save_every": 1}}
        )
    )
    assert cli.main(["train", str(path)]) == 0
    return root, {c.name: c for c in cases}


def test_case_count(fuzz_root):
    _, cases = fuzz_root
    assert 60 <= len(cases) <= 110
    assert sum(c.expect == OK for c in cases.values()) >= 8


def _case_names() -> list[str]:
    # Names only (no files written): build the list against a scratch directory.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        return [c.name for c in _cases(root)]


@pytest.mark.parametrize("name", _case_names())
def test_fuzz_case(fuzz_root, name, capsys):
    root, cases = fuzz_root
    case = cases[name]
    raw = _base(root)
    slug = "".join(ch if ch.isalnum() else "_" for ch in name)[:40]
    slug += f"_{zlib.crc32(name.encode())}"
    fresh = root / "out" / slug
    if case.expect == OK or case.trains:
        raw["output_dir"] = str(fresh)
    if case.edit is not None:
        case.edit(raw)
    if case.config_path is not None:
        cfg = Path(case.config_path)
    else:
        cfg = root / "cases" / f"{slug}.yaml"
        cfg.parent.mkdir(exist_ok=True)
        text = yaml.safe_dump(raw, allow_unicode=True) if case.text is None else case.text
        text = text(raw) if callable(text) else text
        cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    own = Path(raw["output_dir"])
    before = _tree(root)
    capsys.readouterr()
    code = cli.main(["train", str(cfg), *case.overrides])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.startswith("mixtune:")]
    if case.expect == OK:
        assert code == 0, err
        assert not lines, lines
        assert (own / "summary.json").is_file()
    else:
        assert code == 2, f"exit {code}: {err}"
        assert len(lines) == 1 and lines[0].startswith("mixtune: error: "), err
        assert case.expect in lines[0], lines[0]
    after = _tree(root)
    # Nothing changed outside the case's own output_dir (and the config file it wrote).
    skip = own.relative_to(root) if own.is_relative_to(root) else None

    def outside(tree):
        return {
            k: v
            for k, v in tree.items()
            if skip is None or not (k == str(skip) or k.startswith(f"{skip}/"))
        }

    assert outside(after) == outside(before)
    if case.trains and code == 2:
        assert not (own / "final").exists()  # no corrupted final model
        shutil.rmtree(own)
