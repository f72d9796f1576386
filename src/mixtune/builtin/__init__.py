"""mixtune's embedded default: seven instruction domains and a tiny pretrained base model.

Everything here works offline. ``mixtune demo`` (and any config naming ``builtin:<domain>`` or
model ``builtin``) uses it to show real transfer and real forgetting in a few CPU minutes.

Domains
-------
Records are ``{"prompt", "response", "answer"}`` (+ extra keys). ``answer`` is what greedy
generation must reproduce for exact-match accuracy (after lower-casing, whitespace collapsing
and dropping trailing punctuation). Splits are decided by a hash of each record's key, so train
and eval never share a prompt, whatever the seed. Sizes are records per split (train / eval)
with ``n=None``.

Splits ``dev`` and ``test`` are the two halves of eval, by a second hash of the same key (so
they never share a prompt, do not depend on the seed, and the base model saw neither): select
checkpoints on dev, report on test (the DynaMiCS paper's protocol; ``mixtune bench``'s
``protocol: paper``). A real domain's dev and test together are exactly its eval records; a
generated domain draws them like eval and keeps its half's keys. Sizes (dev / test): dialogue
54 / 49, trivia 53 / 58, definitions 290 / 303, code 111 / 105; generated domains 100 / 100 by
default.

============== ========= ============== =========================================================
name           kind      train / eval   source, licence, and what the metrics mean
============== ========= ============== =========================================================
dialogue       real      703 / 103      chatterbot-corpus English small talk (BSD-3-Clause).
                                        Many replies fit one prompt, so accuracy is noise:
                                        watch the loss. Eval prompts are unseen.
trivia         real      542 / 111      chatterbot-corpus ``trivia`` file plus short who/when/
                                        where/which answers from its history, literature, ...
                                        files (BSD-3-Clause); 271 facts. Train has each fact
                                        twice (as written, and behind an opener such as
                                        "Quiz: "); eval re-asks 111 of them behind openers
                                        never used in training ("Trivia time! ..."). Accuracy
                                        therefore measures *retention* of known facts -- the
                                        general knowledge fine-tuning can erode -- not answering
                                        unseen trivia, which no model this size can do.
definitions    real      11407 / 593    WordNet 3.0: "Define the noun 'bank'." -> first-sense
                                        gloss of the 12,000 most sense-tagged words (WordNet
                                        3.0 licence, Princeton). Eval words are unseen: exact
                                        match is near zero, watch the loss.
code           real      1918 / 216     Functions of CPython 3.11's standard library (PSF
                                        licence): "Write a Python function `sig`: <docstring
                                        summary>." -> the function without its docstring, at
                                        most 400 characters. Eval functions are unseen: loss.
arithmetic     generated 5000 / 200     "What is 37 + 48?" -> "85": sums and differences below
                                        100, products up to 12 * 12, five phrasings. Eval
                                        operand pairs are unseen in every phrasing. Accuracy.
word_problems  generated 2000 / 200     Two- or three-step stories (ten templates) answered
                                        with a bare number. Eval number combinations unseen.
                                        Accuracy.
safety         generated 2000 / 200     Harmful requests -> :data:`REFUSAL`; benign look-alikes
                                        ("How do I kill a Python process?") -> a short helpful
                                        answer; ``harmful: bool`` on every record. Accuracy,
                                        plus refusal rate per flag (over-refusal = benign
                                        prompts answered with ``REFUSAL``). Eval harmful
                                        requests are unseen (frame, target) combinations.
============== ========= ============== =========================================================

Generated domains are drawn at call time from ``random.Random`` seeded by (domain, split, seed)
and cost milliseconds; ``n`` can exceed the default sizes. Real domains are read from
``data/*.jsonl.gz`` (made once by ``scripts/extract_builtin_data.py``; licences and notices in
``data/``) and return at most what they have. ``DOMAINS[name]`` also suggests an eval role
(target / constraint / monitor) and the metric worth watching.

Base model and tokenizers
-------------------------
:func:`base_model_path` is a directory loadable with ``AutoModelForCausalLM`` and
``AutoTokenizer``: a 1.6M-parameter Llama (hidden 128, 4 layers, 4 heads, context 256, tied
embeddings) pretrained by ``scripts/pretrain_base.py`` on dialogue, trivia, definitions, some
arithmetic and a slice of safety (never code or word_problems), with a 4096-token byte-level BPE
from ``scripts/build_tokenizer.py``. ``pretrain_info.json`` there records the run and the base
model's per-domain eval numbers. :func:`byte_tokenizer` is an untrained 261-token byte
tokenizer with the same special tokens and chat template, for instant tiny models in tests.
"""

from pathlib import Path

from mixtune.builtin.domains import DOMAINS, DomainInfo, load_domain, write_domain_jsonl
from mixtune.builtin.safety import REFUSAL
from mixtune.builtin.tokenizer import PAD_TOKEN, SPECIAL_TOKENS, byte_tokenizer

__all__ = [
    "DOMAINS",
    "PAD_TOKEN",
    "REFUSAL",
    "SPECIAL_TOKENS",
    "DomainInfo",
    "base_model_path",
    "bench_model_path",
    "byte_tokenizer",
    "load_domain",
    "write_domain_jsonl",
]


def base_model_path() -> Path:
    """The shipped base model + tokenizer directory (inside the installed package)."""
    return Path(__file__).parent / "base"


def bench_model_path() -> Path:
    """The benchmark base model (``model.name_or_path: builtin-bench``): the same architecture
    and tokenizer, pre-trained by ``scripts/pretrain_base.py --bench`` on the ``train_a`` halves
    of definitions, arithmetic, safety and dialogue only, briefly enough that nothing is
    memorised, so held-out constraints have headroom and ``builtin:replay`` is fresh data."""
    return Path(__file__).parent / "bench"
