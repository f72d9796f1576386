"""Shared fixtures: tiny models built from a config, a byte tokenizer, small JSONL datasets."""

from __future__ import annotations

import json
import os
import random
import tempfile

import pytest
import torch

# The token cache (mixtune.data.token_cache) goes to a directory of this test session, never to
# the user's ~/.cache; tests that check the cache itself point it elsewhere.
os.environ["MIXTUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="mixtune-test-cache-")

# Tiny models run fastest on one thread, and the suite must not oversubscribe a shared 2-core box.
torch.set_num_threads(1)

TINY_MODEL = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def addition_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append({"prompt": f"{a}+{b}=", "response": str(a + b)})
    return out


def reverse_records(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = "".join(rng.choice("abcdefgh") for _ in range(6))
        out.append({"instruction": "Reverse the word.", "input": w, "output": w[::-1]})
    return out


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "add.jsonl", addition_records(200))
    write_jsonl(d / "rev.jsonl", reverse_records(120))
    return d


def tiny_config(tmp_path, data_dir, **top) -> dict:
    """A complete run config (dict) over the two toy datasets with a tiny llama."""
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "max_steps": 8,
        "progress": False,
        "model": {"tokenizer": "byte", "config": dict(TINY_MODEL)},
        "datasets": [
            {"name": "add", "path": str(data_dir / "add.jsonl")},
            {"name": "rev", "path": str(data_dir / "rev.jsonl")},
        ],
        "evals": [
            {"name": "add", "from_dataset": "add", "holdout": 16, "batches": 2, "batch_size": 8},
            {
                "name": "rev",
                "from_dataset": "rev",
                "holdout": 16,
                "batches": 2,
                "batch_size": 8,
                "accuracy": False,
            },
        ],
        "mixer": {"name": "proportional"},
        "train": {
            "batch_size": 8,
            "lr": 3e-3,
            "max_length": 64,
            "eval_every": 4,
            "log_every": 2,
            "save_every": 0,
            "schedule": "cosine",
        },
    }
    cfg.update(top)
    return cfg


@pytest.fixture
def make_config(tmp_path, data_dir):
    def make(**top):
        return tiny_config(tmp_path, data_dir, **top)

    return make
