"""The token cache: a hit gives the same arrays; each input it depends on is a different key."""

import numpy as np
import pytest

from mixtune.config import ModelConfig
from mixtune.data import token_cache
from mixtune.data import tokenize as tk
from mixtune.data.formats import Example
from mixtune.engine import build


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXTUNE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tok():
    return build.load_tokenizer(ModelConfig())


def _examples(n=20, word="plus"):
    return [
        Example(
            [
                {"role": "user", "content": f"What is {i} {word} {i}?"},
                {"role": "assistant", "content": f"{2 * i}"},
            ],
            None,
            str(2 * i),
        )
        for i in range(n)
    ] + [Example(None, "raw text " * 5, None)]


def _same(a, b):
    assert len(a) == len(b) and a.prompt_len == b.prompt_len and a.answers == b.answers
    assert (a.n_truncated, a.n_dropped) == (b.n_truncated, b.n_dropped)
    for x, y in zip(a.input_ids + a.labels, b.input_ids + b.labels):
        assert x.dtype == y.dtype == np.int64 and np.array_equal(x, y)


def test_a_hit_returns_what_tokenising_returns_without_tokenising(cache, tok, monkeypatch):
    template = tk.resolve_template(tok, None, quiet=True)
    exs = _examples()
    fresh = tk.tokenize(exs, tok, 12, template, "d", cache=True)  # some truncated
    assert fresh.n_truncated > 0 and len(list(cache.glob("*.npz"))) == 1
    monkeypatch.setattr(tk, "_tokenize", lambda *a: pytest.fail("tokenised again"))
    _same(tk.tokenize(exs, tok, 12, template, "d", cache=True), fresh)


def test_every_input_of_the_result_is_part_of_the_key(tok):
    template = tk.resolve_template(tok, None, quiet=True)
    exs = _examples()
    base = token_cache.key(exs, tok, template, 64)
    assert token_cache.key(_examples(), tok, template, 64) == base  # equal content, equal key
    other_tok = build.load_tokenizer(ModelConfig(tokenizer="byte"))
    changed = {
        "content": token_cache.key(_examples(word="and"), tok, template, 64),
        "selection": token_cache.key(exs[:-1], tok, template, 64),
        "order": token_cache.key(exs[::-1], tok, template, 64),
        "answer": token_cache.key(
            [Example(exs[0].messages, None, "other"), *exs[1:]], tok, template, 64
        ),
        "template": token_cache.key(exs, tok, template + " ", 64),
        "max_length": token_cache.key(exs, tok, template, 65),
        "tokenizer": token_cache.key(exs, other_tok, template, 64),
    }
    for what, k in changed.items():
        assert k != base, what
    assert len(set(changed.values())) == len(changed)


def test_the_code_is_part_of_the_key(tok, monkeypatch):
    template = tk.resolve_template(tok, None, quiet=True)
    base = token_cache.key(_examples(), tok, template, 64)
    monkeypatch.setattr(token_cache, "VERSION", token_cache.VERSION + 1)
    assert token_cache.key(_examples(), tok, template, 64) != base


def test_off_damaged_or_unwritable_caches_never_fail(tmp_path, tok, monkeypatch):
    template = tk.resolve_template(tok, None, quiet=True)
    exs = _examples()
    monkeypatch.setenv("MIXTUNE_CACHE_DIR", "off")
    assert token_cache.directory() is None
    ref = tk.tokenize(exs, tok, 64, template, "d", cache=True)
    d = tmp_path / "c"
    monkeypatch.setenv("MIXTUNE_CACHE_DIR", str(d))
    tk.tokenize(exs, tok, 64, template, "d", cache=True)
    (entry,) = d.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:50])  # truncated: read fails, tokenised again
    _same(tk.tokenize(exs, tok, 64, template, "d", cache=True), ref)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MIXTUNE_CACHE_DIR", str(blocker / "sub"))
    _same(tk.tokenize(exs, tok, 64, template, "d", cache=True), ref)
    assert not list(d.glob(".*.tmp"))


def test_a_resumed_run_reads_its_data_from_the_cache(make_config, tmp_path, cache, monkeypatch):
    from mixtune import config
    from mixtune.engine.loop import Trainer

    raw = make_config(max_steps=2)
    Trainer(config.load(data=raw)).run()
    n = len(list(cache.glob("*.npz")))
    assert n == 4  # two datasets, two evaluation domains
    monkeypatch.setattr(tk, "_tokenize", lambda *a: pytest.fail("tokenised again"))
    Trainer(config.load(data=raw, overrides=["max_steps=2"])).run()
