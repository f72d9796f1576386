"""What a run's inputs hold, hashed cheaply enough to check at every start (the content keys of
:mod:`mixtune.engine.fingerprint`).

- :func:`of_model`: the base model's files (``model.content``);
- :func:`examples_digest`: the selected, tokenised examples of a dataset or evaluation domain
  (``datasets.<name>.digest``, ``evals.<name>.digest``).

Why :func:`examples_digest` and not :func:`mixtune.data.tokenize.digest`: both hash the same
content (every example's tokens, which of them are trained, its reference answer), but ``digest``
makes four hash calls per example in Python, about 5 s per million short examples here -- most
of a start that reads its examples from the token cache (``bench/fingerprint_cost.py``).
``examples_digest`` hashes a few whole arrays (lengths, concatenated token ids and labels, the
answers as one JSON text) with SHA-256, a handful of calls whatever the count. Its values start
with ``v2:``, so a run recorded with ``digest``'s values is still checked exactly: the resume
computes the old digest once (:func:`legacy_digest`) and records the new one as an amendment.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from mixtune import config as config_mod
from mixtune import filehash
from mixtune.data.tokenize import digest

V2 = "v2:"

WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
CONFIGS = (".json", ".model", ".tiktoken", "merges.txt", "vocab.txt")
"""What a model directory's content means: its weight files and the files that configure the
model and its tokenizer (``config.json``, ``tokenizer.json``, ``tokenizer.model``, ...)."""


def of_model(m: config_mod.ModelConfig) -> str | None:
    """What the base model's files hold, or None for a model built at random (``model.config``:
    its settings and the seed say it all).

    A local directory (``builtin`` and ``package:`` resolved) or file: ``sha256:`` and a digest
    of the names, sizes and SHA-256s of its weight and configuration files (:data:`WEIGHTS`,
    :data:`CONFIGS`; with ``model.gguf_file`` only that weight file), each file hashed once per
    version (:mod:`mixtune.filehash`). A hub name: the snapshot commit the local hub cache
    resolves it to (the model was loaded before this, so it is cached), else the name alone
    (``unresolved``)."""
    from mixtune.engine.build import _resolve

    if m.config is not None:
        return None
    name = _resolve(m.name_or_path)
    local = Path(name).expanduser()
    if local.is_file():
        return "sha256:" + short(filehash.of_files([(local.name, local)]))
    if local.is_dir():
        files = [(f.name, f) for f in sorted(local.iterdir()) if f.is_file() and _counts(f, m)]
        return "sha256:" + short(filehash.of_files(files))
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, m.gguf_file or "config.json")
    except Exception:  # (an id the hub library rejects, or no hub library)
        found = None
    if isinstance(found, str):  # .../snapshots/<commit>/<file>
        return f"hub:{name}@{Path(found).parent.name}"
    return f"hub:{name} (unresolved)"


def _counts(f: Path, m: config_mod.ModelConfig) -> bool:
    """Whether file ``f`` of a model directory is part of the model's content."""
    if f.name.endswith(WEIGHTS):
        return f.name == m.gguf_file if m.gguf_file else not f.name.endswith(".gguf")
    return f.name.endswith(CONFIGS)


def examples_digest(input_ids, labels, answers) -> str:
    """A content hash of tokenised examples, in order (``v2:`` and 16 hex digits): their token
    ids, their labels (which tokens are trained) and their reference answers."""
    h = hashlib.sha256(b"mixtune examples v2\n")
    for column in (input_ids, labels):  # each: the lengths, then every value, as int64
        lengths = np.fromiter((len(x) for x in column), np.int64, len(column))
        h.update(lengths.astype("<i8", copy=False))
        if lengths.sum():
            h.update(np.concatenate(column).astype("<i8", copy=False))  # (no copy if int64)
    text = json.dumps(list(answers), ensure_ascii=False)
    h.update(text.encode("utf-8", "surrogatepass"))
    return V2 + short(h.hexdigest())


def legacy_digest(input_ids, labels, answers) -> str:
    """The digest runs recorded before :func:`examples_digest` (:func:`tokenize.digest`)."""
    return digest(input_ids, labels, answers)


def short(hexdigest: str) -> str:
    """The first 16 hex digits (64 bits): plenty to tell two versions of an input apart."""
    return hexdigest[:16]
