"""Extract the real-text built-in domains once into small files shipped with mixtune.

Writes ``src/mixtune/builtin/data/{dialogue,trivia,definitions,code}.jsonl.gz`` plus the
licence texts of their sources. Records are ``{"prompt", "response", "key", "source"}``;
``key`` groups records that must land in the same split (see ``mixtune.builtin.domains``),
which is decided at load time, not here, so the files stay a plain copy of the sources.

Sources (install them first; nothing is fetched at run time):

* ``pip install --no-deps chatterbot-corpus`` -- English YAML conversations (BSD-3-Clause).
* ``apt-get install --no-install-recommends wordnet-base`` -- WordNet 3.0 in /usr/share/wordnet.
* the running interpreter's own standard library (PSF licence) for ``code``; the output
  therefore depends on the Python version, which is recorded in ``data/NOTICE``.

Run: ``python scripts/extract_builtin_data.py`` (about 20 s). Output is byte-for-byte
deterministic for a given set of inputs (gzip mtime is fixed at 0).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import itertools
import json
import re
import shutil
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "src" / "mixtune" / "builtin" / "data"
WORDNET = Path("/usr/share/wordnet")
WORDNET_COPYRIGHT = Path("/usr/share/doc/wordnet-base/copyright")

# chatterbot categories whose question-like pairs with short, impersonal answers are trivia
TRIVIA_FILES = (
    "trivia",
    "history",
    "science",
    "literature",
    "politics",
    "computers",
    "sports",
    "movies",
)
SKIP_FILES = ("coding",)  # long code answers in Markdown: neither dialogue nor trivia
QUESTION = re.compile(r"^(who|when|where|which|in what|in which)\b", re.IGNORECASE)
PERSONAL = re.compile(r"\b(i|i'm|im|my|me|you|your|we)\b", re.IGNORECASE)
STDLIB_SKIP = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "ensurepip",
    "turtledemo",
    "tkinter",
    "pydoc_data",
    "__pycache__",
    "distutils",
}
MAX_CODE_CHARS = 400
MAX_DEFS = 12000


def norm_key(text: str) -> str:
    """Case- and punctuation-blind key, so near-duplicate prompts share a split."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def clean(text: object) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------- chatterbot: dialogue + trivia
def chatterbot_dir() -> Path:
    import chatterbot_corpus

    return Path(chatterbot_corpus.__file__).parent / "data" / "english"


def chatterbot_pairs() -> Iterator[tuple[str, str, str]]:
    """(category file, statement, reply) for each consecutive pair, files in name order."""
    for path in sorted(chatterbot_dir().glob("*.yml")):
        if path.stem in SKIP_FILES:
            continue
        for conv in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            if not isinstance(conv, list):  # one malformed entry in trivia.yml is a bare string
                continue
            turns = [clean(t) for t in conv]
            for a, b in itertools.pairwise(turns):
                if a and b:
                    yield path.stem, a, b


def is_trivia(category: str, prompt: str, reply: str) -> bool:
    if category not in TRIVIA_FILES:
        return False
    if category == "trivia":
        return True
    # outside trivia.yml only who/when/where/which questions with short answers are factual;
    # "what is X" there is mostly banter ("what is gravitation" -> "an invitation to a burial")
    return QUESTION.match(prompt) is not None and len(reply) <= 40 and not PERSONAL.search(reply)


def extract_chatterbot() -> tuple[list[dict], list[dict]]:
    dialogue, trivia, seen, asked = [], [], set(), set()
    for cat, prompt, reply in chatterbot_pairs():
        if is_trivia(cat, prompt, reply):
            key = norm_key(prompt)
            if key in asked:  # keep one answer per question, so exact match is well defined
                continue
            asked.add(key)
            trivia.append({"prompt": prompt, "response": reply, "key": key, "source": cat})
        elif len(prompt) + len(reply) <= 400 and (prompt, reply) not in seen:
            seen.add((prompt, reply))
            dialogue.append(
                {"prompt": prompt, "response": reply, "key": norm_key(prompt), "source": cat}
            )
    return dialogue, trivia


# ---------------------------------------------------------------- WordNet: definitions
POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


def first_glosses(pos: str) -> Iterator[tuple[int, str, str]]:
    """(tagged-sense count, lemma, gloss of the most frequent sense) for common lemmas."""
    data = (WORDNET / f"data.{pos}").read_bytes()
    for line in (WORDNET / f"index.{pos}").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):  # licence header
            continue
        f = line.split()
        lemma, n_ptr = f[0], int(f[3])
        tagged = int(f[5 + n_ptr])
        offset = int(f[6 + n_ptr])  # synsets are listed most frequent first
        if tagged < 1 or not re.fullmatch(r"[a-z]{3,}", lemma):
            continue
        entry = data[offset : data.index(b"\n", offset)].decode("latin-1")
        gloss = entry.split(" | ", 1)[1].split('; "', 1)[0].strip().strip(";").strip()
        if 8 <= len(gloss) <= 160:
            yield tagged, lemma, gloss


def extract_wordnet() -> list[dict]:
    rows = [
        (tagged, lemma, pos, gloss) for pos in POS for tagged, lemma, gloss in first_glosses(pos)
    ]
    rows.sort(key=lambda r: (-r[0], r[1], r[2]))  # most used words first, ties by name
    out = []
    for _, lemma, pos, gloss in rows[:MAX_DEFS]:
        out.append(
            {
                "prompt": f"Define the {POS[pos]} '{lemma}'.",
                "response": gloss,
                "key": lemma,
                "source": f"wordnet-3.0/{pos}",
            }
        )
    out.sort(key=lambda r: (r["key"], r["prompt"]))
    return out


# ---------------------------------------------------------------- stdlib: code
def stdlib_files() -> Iterator[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not STDLIB_SKIP.intersection(rel.parts) and not rel.name.startswith("test_"):
            yield path


def summary(doc: str) -> str | None:
    """The docstring's first sentence, when it reads as a description."""
    first = clean(doc.strip().split("\n\n", 1)[0]).split(". ", 1)[0].rstrip(".")
    if not first or "(" in first.split(" ", 1)[0] or len(first) > 140 or not first[0].isalpha():
        return None
    return first


def stub(node: ast.FunctionDef) -> bool:
    """A body that is only ``pass``/``...``/``raise NotImplementedError`` teaches nothing."""
    rest = node.body[1:]
    return len(rest) == 1 and (
        isinstance(rest[0], (ast.Pass, ast.Expr))
        or (isinstance(rest[0], ast.Raise) and "NotImplementedError" in ast.dump(rest[0]))
    )


def functions(path: Path, root: Path) -> Iterator[dict]:
    src = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return
    lines = src.splitlines()
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2 or (text := summary(doc)) is None or stub(node):
            continue
        ds = node.body[0]
        if ds.lineno == node.lineno:  # docstring on the def line
            continue
        body = lines[node.lineno - 1 : ds.lineno - 1] + lines[ds.end_lineno : node.end_lineno]
        code = textwrap.dedent("\n".join(body)).strip("\n")
        header = code.split(":\n", 1)[0]
        if len(code) > MAX_CODE_CHARS or "\t" in code or not code.isascii() or "\n" in header:
            continue
        sig = header.removeprefix("def ").strip()
        prompt = f"Write a Python function `{sig}`: {text[0].lower()}{text[1:]}."
        yield {
            "prompt": prompt,
            "response": code,
            "key": norm_key(prompt),
            "source": f"{module}:{node.lineno}",
        }


def extract_code() -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out, seen = [], set()
    for path in stdlib_files():
        for rec in functions(path, root):
            if rec["response"] not in seen and rec["key"] not in seen:
                seen.update((rec["response"], rec["key"]))
                out.append(rec)
    return out


# ---------------------------------------------------------------- output
def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    """Deterministic gzip: fixed mtime and no file name in the header."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    with open(path, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as gz:
        gz.write(payload)


def write_licenses(out: Path) -> None:
    import chatterbot_corpus

    cb = Path(chatterbot_corpus.__file__).parent
    lic = next((p for p in (cb / "license.md", cb.parent / "license.md") if p.exists()), None)
    text = lic.read_text() if lic else CHATTERBOT_LICENSE
    (out / "LICENSE-chatterbot-corpus.txt").write_text(text)
    (out / "LICENSE-wordnet.txt").write_text(WORDNET_COPYRIGHT.read_text())
    shutil.copyfile(
        Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt", out / "LICENSE-python.txt"
    )


CHATTERBOT_LICENSE = """\
Copyright (c) 2017, Gunther Cox All rights reserved.

Redistribution and use in source and binary forms, with or without modification, are permitted
provided that the following conditions are met:

    Redistributions of source code must retain the above copyright notice, this list of
    conditions and the following disclaimer.

    Redistributions in binary form must reproduce the above copyright notice, this list of
    conditions and the following disclaimer in the documentation and/or other materials
    provided with the distribution.

    Neither the name of chatterbot nor the names of its contributors may be used to endorse or
    promote products derived from this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR
IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND
FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR
CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE,
DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY,
WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY
WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dialogue, trivia = extract_chatterbot()
    sets = {
        "dialogue": dialogue,
        "trivia": trivia,
        "definitions": extract_wordnet(),
        "code": extract_code(),
    }
    for name, records in sets.items():
        write_jsonl_gz(args.out / f"{name}.jsonl.gz", records)
        print(f"{name:12s} {len(records):6d} records")
    write_licenses(args.out)
    import chatterbot_corpus

    version = getattr(chatterbot_corpus, "__version__", "?")
    (args.out / "NOTICE").write_text(NOTICE.format(py=sys.version.split()[0], cb=version))


NOTICE = """\
mixtune built-in data: third-party notices
===========================================

dialogue.jsonl.gz, trivia.jsonl.gz
    Extracted from the chatterbot-corpus package (version {cb}), English YAML files.
    Copyright (c) 2017, Gunther Cox. BSD 3-Clause licence: LICENSE-chatterbot-corpus.txt.

definitions.jsonl.gz
    Glosses from WordNet 3.0 (Debian package wordnet-base).
    WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
    Licence and disclaimer: LICENSE-wordnet.txt.

code.jsonl.gz
    Functions (docstring removed) from the standard library of CPython {py}.
    Copyright (c) 2001 Python Software Foundation; All Rights Reserved.
    PSF License Agreement: LICENSE-python.txt.

These files were produced by scripts/extract_builtin_data.py; the records are shortened and
reformatted copies of the originals. The generated domains (arithmetic, word_problems, safety)
are produced at run time by mixtune itself and are covered by mixtune's own licence.
"""


if __name__ == "__main__":
    main()
