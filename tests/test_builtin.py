"""The embedded default: built-in domains, the byte tokenizer, the shipped base model."""

from __future__ import annotations

import json
import re

import pytest

from mixtune.builtin import (
    DOMAINS,
    REFUSAL,
    SPECIAL_TOKENS,
    base_model_path,
    byte_tokenizer,
    load_domain,
    write_domain_jsonl,
)
from mixtune.builtin.domains import DATA
from mixtune.builtin.split import in_eval, in_test
from mixtune.data.template import DEFAULT_CHAT_TEMPLATE, EOS_TOKEN

NAMES = sorted(DOMAINS)
MSGS = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
RENDERED = "<|user|>\nWhat is 2 + 3?\n<|assistant|>\n5<|end|>\n"


def prompts(records: list[dict]) -> set[str]:
    return {r["prompt"] for r in records}


def test_at_least_six_domains_with_documented_info():
    assert len(DOMAINS) >= 6
    for name, info in DOMAINS.items():
        assert info.name == name
        assert info.kind in ("real", "generated", "mixture")
        assert info.role in ("target", "constraint", "monitor")
        assert info.metric in ("accuracy", "loss")
        assert info.license and info.description


def test_unknown_domain_and_split_raise():
    with pytest.raises(ValueError, match="valid names: .*arithmetic"):
        load_domain("nope")
    with pytest.raises(ValueError, match="split"):
        load_domain("arithmetic", split="validation")


@pytest.mark.parametrize("name", NAMES)
def test_records_have_the_contract_shape(name):
    for rec in load_domain(name, "eval", n=20):
        for key in ("prompt", "response", "answer"):
            assert isinstance(rec[key], str) and rec[key].strip(), (name, key, rec)
        assert len(rec["prompt"]) + len(rec["response"]) < 700, rec


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_by_seed(name):
    a = load_domain(name, "train", n=100, seed=3)
    assert a == load_domain(name, "train", n=100, seed=3)
    assert load_domain(name, "eval", n=30, seed=3) == load_domain(name, "eval", n=30, seed=3)
    assert a != load_domain(name, "train", n=100, seed=4)


@pytest.mark.parametrize("name", NAMES)
def test_train_and_eval_never_overlap_and_are_big_enough(name):
    train = load_domain(name, "train")
    ev = load_domain(name, "eval")
    assert len(train) >= 200 and len(ev) >= 50, (len(train), len(ev))
    assert not prompts(train) & prompts(ev)
    # the split is a property of the key, not of the seed
    assert not prompts(load_domain(name, "train", seed=1)) & prompts(
        load_domain(name, "eval", seed=2)
    )


@pytest.mark.parametrize("name", NAMES)
def test_dev_and_test_halve_eval(name):
    ev, dev, test = (load_domain(name, split, seed=2) for split in ("eval", "dev", "test"))
    assert not prompts(dev) & prompts(test)
    assert dev == load_domain(name, "dev", seed=2) and test == load_domain(name, "test", seed=2)
    # about half each, enough for a suite's 4 x 8 examples
    assert len(dev) >= 32 and len(test) >= 32
    assert 0.35 < len(dev) / (len(dev) + len(test)) < 0.65
    # inside eval: never trained on, for any seed
    assert not (prompts(dev) | prompts(test)) & prompts(load_domain(name, "train", seed=1))
    # the halves are a property of the key: a prompt never changes sides with the seed
    assert not prompts(load_domain(name, "dev", seed=1)) & prompts(
        load_domain(name, "test", seed=3)
    )
    if DOMAINS[name].kind == "real":  # exactly eval, split in two, in eval's order
        assert dev + test != ev and sorted(dev + test, key=str) == sorted(ev, key=str)
        assert dev == [r for r in ev if r in dev]
    elif DOMAINS[name].kind == "generated":  # drawn like eval, each half keeps its side
        from mixtune.builtin.domains import EVAL_HALF_N

        assert len(dev) == len(test) == EVAL_HALF_N
        assert prompts(dev) <= prompts(load_domain(name, "eval", n=1000, seed=2))


def test_dev_test_hash_is_pinned_and_halves():
    # pinned like in_eval: a different hash would move records between dev and test
    assert [k for k in map(str, range(20)) if in_test("code", k)] == [
        "3",
        "5",
        "13",
        "14",
        "16",
        "17",
    ]
    assert sum(in_test("x", str(i)) for i in range(10000)) in range(4800, 5200)


def test_builtin_dev_and_test_read_as_evaluation_splits():
    from mixtune.data.sources import read_records
    from mixtune.errors import DataError

    assert read_records("builtin:trivia", "test") == load_domain("trivia", "test")
    with pytest.raises(DataError, match="'dev', 'test'"):
        read_records("builtin:trivia", "validation")


def test_n_limits_and_default_sizes():
    assert len(load_domain("arithmetic", "train", n=7)) == 7
    assert len(load_domain("arithmetic", "train", n=6000)) == 6000  # generated: beyond default
    assert len(load_domain("trivia", "eval", n=10**6)) == len(load_domain("trivia", "eval"))
    assert load_domain("code", "train", n=0) == []


def test_split_hash_is_pinned_and_proportional():
    # pinned: a different hash would silently move records between train and eval, so eval
    # numbers from older runs would no longer be comparable
    assert [k for k in map(str, range(60)) if in_eval("arithmetic", k, 100)] == [
        "4",
        "13",
        "22",
        "23",
        "26",
        "42",
    ]
    assert sum(in_eval("x", str(i), 100) for i in range(10000)) in range(900, 1100)


def test_arithmetic_answers_are_correct():
    for rec in load_domain("arithmetic", "train", n=300):
        a, op, b = re.search(r"(\d+) ([-+*]|plus|minus|times) (\d+)", rec["prompt"]).groups()
        op = {"plus": "+", "minus": "-", "times": "*"}.get(op, op)
        want = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert rec["answer"] == rec["response"] == str(want)


def test_word_problems_have_numeric_answers():
    for rec in load_domain("word_problems", "eval"):
        assert re.fullmatch(r"\d+", rec["answer"]), rec


def test_safety_flags_both_kinds_and_refuses_only_harmful():
    for split in ("train", "eval"):
        recs = load_domain("safety", split)
        harmful = [r for r in recs if r["harmful"]]
        benign = [r for r in recs if not r["harmful"]]
        assert len(harmful) >= 50 and len(benign) >= 50
        assert all(r["answer"] == r["response"] == REFUSAL for r in harmful)
        assert all(r["answer"] != REFUSAL for r in benign)


def test_trivia_eval_asks_known_facts_in_new_words():
    train = load_domain("trivia", "train")
    answers = {r["answer"] for r in train}
    assert all(r["answer"] in answers for r in load_domain("trivia", "eval"))


def test_write_domain_jsonl(tmp_path):
    path = write_domain_jsonl("arithmetic", tmp_path / "sub" / "a.jsonl", "eval", 5, seed=1)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines == load_domain("arithmetic", "eval", 5, seed=1)


def test_data_files_ship_with_licenses():
    for name, info in DOMAINS.items():
        if info.kind == "real":
            assert (DATA / f"{name}.jsonl.gz").is_file()
    for f in (
        "LICENSE-chatterbot-corpus.txt",
        "LICENSE-wordnet.txt",
        "LICENSE-python.txt",
        "NOTICE",
        "README.md",
    ):
        assert (DATA / f).is_file(), f


def test_byte_tokenizer_round_trips_and_renders_the_template():
    tok = byte_tokenizer()
    assert len(tok) == 256 + len(SPECIAL_TOKENS)
    text = "naïve café — 3 + 4 = 7\n\tdef f(x): return x  # 😀"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) and max(ids) < 256
    assert tok.decode(ids) == text
    rendered = tok.apply_chat_template(MSGS, tokenize=False)
    assert rendered == RENDERED
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == rendered
    assert tok.eos_token == EOS_TOKEN and ids[-2] == tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|user|>") == ids[0]
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    prompt = tok.apply_chat_template(MSGS[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nWhat is 2 + 3?\n<|assistant|>\n"


def test_base_tokenizer_loads_with_the_current_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_path())
    # a drift here means: python scripts/build_tokenizer.py --template-only
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tok.apply_chat_template(MSGS, tokenize=False) == RENDERED
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == "<|pad|>"
    for special in SPECIAL_TOKENS:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok.decode(tok("x = 37 + 48", add_special_tokens=False)["input_ids"]) == "x = 37 + 48"


@pytest.mark.parametrize("which", ["builtin", "builtin-bench"])
def test_base_model_loads_and_predicts(which):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mixtune.builtin import bench_model_path
    from mixtune.engine.build import _resolve

    path = base_model_path() if which == "builtin" else bench_model_path()
    assert _resolve(which) == str(path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.vocab_size == len(tok)
    assert cfg.max_position_embeddings == 256 and cfg.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    ids = tok(
        tok.apply_chat_template(MSGS, tokenize=False), return_tensors="pt", add_special_tokens=False
    )["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and loss < 0.8 * torch.log(torch.tensor(float(len(tok))))
    info = json.loads((path / "pretrain_info.json").read_text())
    assert {
        "steps",
        "tokens",
        "tokens_per_s",
        "final_train_response_loss",
        "eval",
        "seed",
        "command",
    } <= set(info)
    if which == "builtin-bench":  # pre-trained on train_a halves, no trivia: nothing memorised
        assert "--bench" in info["command"] and "trivia" not in info["examples"]
        assert min(m["loss"] for d, m in info["eval"].items() if d != "code") > 0.5


@pytest.mark.parametrize("name", [n for n in NAMES if DOMAINS[n].kind != "mixture"])
def test_train_a_and_train_b_halve_train(name):
    tr, a, b = (load_domain(name, split, seed=2) for split in ("train", "train_a", "train_b"))
    assert a and b and not prompts(a) & prompts(b)
    assert 0.35 < len(a) / (len(a) + len(b)) < 0.65
    assert not (prompts(a) | prompts(b)) & prompts(load_domain(name, "eval", seed=2))
    # a property of the key: never changes sides with the seed
    assert not prompts(load_domain(name, "train_a", seed=1)) & prompts(
        load_domain(name, "train_b", seed=3)
    )
    if DOMAINS[name].kind == "real":  # exactly train, split in two
        assert sorted(a + b, key=str) == sorted(tr, key=str)


def test_replay_is_fresh_general_data_in_its_shares():
    from mixtune.builtin.replay import REPLAY

    train = load_domain("replay", "train", n=1000, seed=0)
    shares = {d: sum(r["source"] == d for r in train) / len(train) for d in REPLAY}
    assert shares == pytest.approx(REPLAY, abs=0.01)
    # drawn from the train_b halves: never the train_a examples the bench base learned from
    for d in REPLAY:
        mine = prompts([r for r in train if r["source"] == d])
        if DOMAINS[d].kind == "real":
            assert mine <= prompts(load_domain(d, "train_b", seed=0))
        assert not mine & prompts(load_domain(d, "train_a", seed=0, n=3000))
    dev, test = load_domain("replay", "dev"), load_domain("replay", "test")
    assert dev and test and not prompts(dev) & prompts(test)
    assert load_domain("replay", "train", n=1000, seed=0) == train  # deterministic
