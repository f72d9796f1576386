import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mixtune.data.bytetok import byte_tokenizer
from mixtune.data.formats import detect, normalize
from mixtune.data.sources import read_records
from mixtune.data.template import DEFAULT_CHAT_TEMPLATE
from mixtune.data.tokenize import tokenize
from mixtune.errors import DataError
from mixtune.losses.core import IGNORE

RECORDS = {
    "messages": {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"},
        ]
    },
    "prompt_response": {"prompt": "2+2=", "response": "4"},
    "instruction": {"instruction": "Reverse", "input": "abc", "output": "cba"},
    "text": {"text": "plain text"},
}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _decode_trained(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_every_format_is_detected_and_masked(tok, fmt):
    rec = RECORDS[fmt]
    assert detect(rec) == fmt
    (ex,) = normalize([rec], "auto", None, "t")
    data = tokenize([ex], tok, 256, DEFAULT_CHAT_TEMPLATE, "t")
    ids, labels = data.input_ids[0], data.labels[0]
    trained = _decode_trained(tok, ids, labels)
    expected = {
        "messages": "A1<|end|>\nA2<|end|>\n",
        "prompt_response": "4<|end|>\n",
        "instruction": "cba<|end|>\n",
        "text": "plain text<|end|>",
    }[fmt]
    assert trained == expected
    if fmt != "text":  # the prompt is never trained
        prompt = tok.decode(ids[: data.prompt_len[0]])
        assert prompt.endswith("<|assistant|>\n")
        if fmt != "messages":  # (earlier assistant turns are trained too)
            assert all(lab == IGNORE for lab in labels[: data.prompt_len[0]])


def test_explicit_format_and_field_renames(tok):
    recs = [{"question": "hi", "solution": "yo", "answer": "yo"}]
    (ex,) = normalize(recs, "prompt_response", {"prompt": "question", "response": "solution"}, "t")
    assert ex.messages[-1]["content"] == "yo" and ex.answer == "yo"


def test_truncation_is_counted_and_prompt_only_examples_dropped(tok):
    exs = normalize(
        [{"prompt": "p" * 10, "response": "r" * 50}, {"prompt": "q" * 80, "response": "s"}],
        "auto",
        None,
        "t",
    )
    data = tokenize(exs, tok, 40, DEFAULT_CHAT_TEMPLATE, "t")
    assert data.n_truncated == 2 and data.n_dropped == 1 and len(data) == 1
    assert len(data.input_ids[0]) == 40
    with pytest.raises(DataError, match="max_length=8"):
        tokenize(exs, tok, 8, DEFAULT_CHAT_TEMPLATE, "t")


def test_sources_jsonl_json_parquet_csv(tmp_path):
    recs = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(3)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "a.json").write_text(json.dumps(recs))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet")
    (tmp_path / "a.csv").write_text(
        "prompt,response\n" + "".join(f"{r['prompt']},{r['response']}\n" for r in recs)
    )
    for ext in ("jsonl", "json", "parquet", "csv"):
        assert read_records(str(tmp_path / f"a.{ext}")) == recs, ext


def test_malformed_jsonl_names_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        read_records(str(tmp_path / "bad.jsonl"))


def test_missing_field_names_record_and_field():
    with pytest.raises(DataError, match="record 2: missing field 'response'"):
        normalize([{"prompt": "a", "response": "b"}, {"prompt": "c"}], "prompt_response", None, "t")


def test_hub_dataset_saved_locally(tmp_path):
    datasets = pytest.importorskip("datasets")
    recs = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(4)]
    datasets.Dataset.from_list(recs).to_parquet(str(tmp_path / "train.parquet"))
    # A local dataset directory goes through `datasets.load_dataset`, like a hub name.
    got = read_records(str(tmp_path), split="train")
    assert got == recs


def test_label_counts(tok):
    exs = normalize([RECORDS["prompt_response"]], "auto", None, "t")
    data = tokenize(exs, tok, 64, DEFAULT_CHAT_TEMPLATE, "t")
    assert data.label_counts[0] == int((np.asarray(data.labels[0][1:]) != IGNORE).sum()) > 0
