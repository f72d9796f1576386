"""Tokenise examples with the model's chat template; mask everything but the assistant's turns.

The chat template renders the conversation; each segment (everything up to an assistant turn,
then the assistant turn itself) is tokenised on its own and the pieces are concatenated, so the
boundary between prompt and response is exact whatever the tokenizer merges. Only assistant
turns carry labels, except those marked ``weight: 0`` (see :mod:`mixtune.data.formats`). Raw
``text`` examples train on every token (plus EOS). Tool calls, tool results and tool definitions
are rendered by the template (``tools=`` is passed); a template that cannot render the ones the
data holds is refused (:mod:`mixtune.data.tools`) rather than trained on wrongly.

A record far longer than ``max_length`` is cut at the character level first
(:func:`char_budget`): the tokens it keeps are the same, but a 50 MB line costs what a
``max_length`` one does.

When the tokenizer has no chat template, :data:`mixtune.data.template.DEFAULT_CHAT_TEMPLATE`
is used (a warning says so); ``model.chat_template`` overrides both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from mixtune.data import token_cache
from mixtune.data.formats import Example
from mixtune.data.template import DEFAULT_CHAT_TEMPLATE
from mixtune.data.tools import check_tools
from mixtune.errors import DataError

log = logging.getLogger(__name__)

IGNORE = -100
"""Label of a token not to learn (prompt, padding): the ``ignore_index`` of cross-entropy."""

MIN_CHARS_PER_TOKEN = 64
"""The least :func:`chars_per_token` assumes, whatever the vocabulary says."""
MARGIN_TOKENS = 64
"""Tokens kept past ``max_length`` by the character cut, so that the merges a tokenizer makes
across the cut never reach the tokens that are kept."""


@dataclass
class Tokenized:
    """A tokenised set of examples, in memory as numpy arrays."""

    input_ids: list[np.ndarray] = field(default_factory=list)  # each (T,), int64
    labels: list[np.ndarray] = field(default_factory=list)  # each (T,), IGNORE where untrained
    prompt_len: list[int] = field(default_factory=list)  # tokens before the final assistant turn
    answers: list[str | None] = field(default_factory=list)
    n_truncated: int = 0  # examples cut at max_length (kept)
    n_dropped: int = 0  # examples with no trained token left after truncation (dropped)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def label_counts(self) -> np.ndarray:
        """Supervised tokens per example (positions t >= 1 with a label), the loss normaliser."""
        return np.array([int((lab[1:] != IGNORE).sum()) for lab in self.labels], np.int64)


def resolve_template(tokenizer, override: str | None, quiet: bool = False) -> str:
    """The chat template in use: the config's, the tokenizer's, or mixtune's fallback (said
    once, unless ``quiet``)."""
    if override:
        return override
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if not quiet:
        log.warning("tokenizer has no chat template; using mixtune's fallback template")
    return DEFAULT_CHAT_TEMPLATE


def tokenize(
    examples: list[Example],
    tokenizer,
    max_length: int,
    template: str,
    where: str,
    cache: bool = False,
) -> Tokenized:
    """Tokenise ``examples``; raises :class:`DataError` when nothing trainable is left.

    ``cache``: reuse (and store) the result in the token cache (:mod:`mixtune.data.token_cache`),
    keyed by the examples, the tokenizer, the template and ``max_length``."""
    entry = token_cache.key(examples, tokenizer, template, max_length) if cache else None
    hit = token_cache.load(entry) if entry else None
    out = Tokenized(**hit) if hit is not None else None
    if out is None:
        out = _tokenize(examples, tokenizer, max_length, template, where)
        if entry:
            token_cache.save(entry, out)
    else:
        log.debug("%s: %d examples from the token cache", where, len(out))
    if out.n_dropped:
        log.warning(
            "%s: dropped %d example(s) whose prompt fills max_length=%d",
            where,
            out.n_dropped,
            max_length,
        )
    return out


def _tokenize(
    examples: list[Example], tokenizer, max_length: int, template: str, where: str
) -> Tokenized:
    budget = char_budget(tokenizer, max_length)
    capped = [_cap(ex, budget) for ex in examples]
    examples = [ex for ex, _ in capped]
    check_tools(examples, tokenizer, template, where)
    pieces: list[list[tuple[str, bool]]] = []
    t0 = last = time.perf_counter()
    for i, ex in enumerate(examples):
        pieces.append(_segments(ex, tokenizer, template, where))
        if i % 1000 == 999 and (now := time.perf_counter()) - last > 10:  # long work: progress
            log.info("%s: rendered %d/%d examples (%.0f s)", where, i + 1, len(examples), now - t0)
            last = now
    flat = [text for segs in pieces for text, _ in segs]
    ids_flat = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    eos = tokenizer.eos_token_id
    out = Tokenized()
    longest_prompt = 0
    j = 0
    for ex, segs, (_, lost_turn) in zip(examples, pieces, capped):
        ids: list[int] = []
        labels: list[int] = []
        prompt_len = 0
        for text, trained in segs:
            seg = ids_flat[j]
            j += 1
            if trained:
                prompt_len = len(ids)
            ids.extend(seg)
            labels.extend(seg if trained else [IGNORE] * len(seg))
        if ex.messages is None:
            if bos := _bos(tokenizer):
                ids, labels = [bos] + ids, [IGNORE] + labels
            if eos is not None:
                ids.append(eos)
                labels.append(eos)
        if lost_turn:  # the final trained turn was cut off: it starts past every kept token
            prompt_len = len(ids)
        longest_prompt = max(longest_prompt, prompt_len)
        if len(ids) > max_length:
            out.n_truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        lab = np.asarray(labels, np.int64)
        if not (lab[1:] != IGNORE).any():
            out.n_dropped += 1
            continue
        out.input_ids.append(np.asarray(ids, np.int64))
        out.labels.append(lab)
        out.prompt_len.append(prompt_len)
        out.answers.append(ex.answer)
    if not out.input_ids:
        raise DataError(
            f"{where}: no example has a response token within train.max_length={max_length} "
            f"(longest prompt: {longest_prompt} tokens); raise train.max_length or shorten prompts"
        )
    return out


def digest(input_ids, labels, answers) -> str:
    """A content hash of tokenised examples, in order: their tokens, which of them are trained
    and their reference answers. Equal digests mean the same selected examples, so a resumed run
    can tell that its data is what the run was started on (cheap next to tokenising)."""
    h = hashlib.blake2b(digest_size=8)
    for ids, lab, answer in zip(input_ids, labels, answers):
        h.update(len(ids).to_bytes(8, "little"))
        h.update(np.asarray(ids, np.int64).tobytes())
        h.update(np.asarray(lab, np.int64).tobytes())
        text = b"" if answer is None else answer.encode("utf-8", "surrogatepass")
        h.update((-1 if answer is None else len(text)).to_bytes(8, "little", signed=True) + text)
    return h.hexdigest()


def _bos(tokenizer) -> int | None:
    add = getattr(tokenizer, "add_bos_token", False)
    return tokenizer.bos_token_id if add and tokenizer.bos_token_id is not None else None


def _segments(ex: Example, tokenizer, template: str, where: str) -> list[tuple[str, bool]]:
    """``[(text, trained), ...]`` covering the rendered conversation."""
    if ex.messages is None:
        return [(ex.text, True)]
    msgs = ex.messages
    segs: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if not _trained(m):
            continue
        prefix = _render(tokenizer, template, msgs[:i], True, ex.tools)
        full = _render(tokenizer, template, msgs[: i + 1], False, ex.tools)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise DataError(
                f"{where}: the chat template does not render conversations prefix by prefix; "
                "set model.chat_template to one that does"
            )
        segs.append((prefix[len(done) :], False))
        segs.append((full[len(prefix) :], True))
        done = full
    # When the last message is trained, ``done`` already is the whole conversation rendered.
    last_trained = bool(segs) and _trained(msgs[-1])
    tail = "" if last_trained else _render(tokenizer, template, msgs, False, ex.tools)[len(done) :]
    if tail:
        segs.append((tail, False))
    return [(t, tr) for t, tr in segs if t or tr]


def _trained(m: dict) -> bool:
    return m["role"] == "assistant" and m.get("weight", 1) != 0


def _render(tokenizer, template: str, msgs: list[dict], gen: bool, tools=None) -> str:
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        msgs, chat_template=template, tokenize=False, add_generation_prompt=gen, **extra
    )


# ----------------------------------------------------------------------------------------------
# Cutting records far longer than max_length before tokenising

_CHARS_PER_TOKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chars_per_token(tokenizer) -> int | None:
    """An upper bound on how many characters of text one token stands for, or None if unknown.

    A token covers at most as many characters as its vocabulary entry has (byte-level and
    SentencePiece entries spell each byte or character with at least one symbol); a tokenizer
    with a normalizer may also compose characters (NFC), hence the factor 4 then. Never less
    than :data:`MIN_CHARS_PER_TOKEN`: a generous bound only costs a longer cut.
    """
    try:
        return _CHARS_PER_TOKEN[tokenizer]
    except (KeyError, TypeError):
        pass
    try:
        longest = max(map(len, tokenizer.get_vocab()))
    except Exception:  # a tokenizer without a readable vocabulary: no cut
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if getattr(backend, "normalizer", None) is not None:
        longest *= 4
    bound = max(MIN_CHARS_PER_TOKEN, longest)
    try:
        _CHARS_PER_TOKEN[tokenizer] = bound
    except TypeError:
        pass
    return bound


def char_budget(tokenizer, max_length: int) -> int | None:
    """Characters of message content (or raw text) past which an example cannot fit in
    ``max_length`` tokens: text that long has more than ``max_length + MARGIN_TOKENS`` tokens
    whatever it says, so cutting it there keeps every token that truncation keeps."""
    per = chars_per_token(tokenizer)
    return None if per is None else (max_length + MARGIN_TOKENS) * per


def _cap(ex: Example, budget: int | None) -> tuple[Example, bool]:
    """``ex`` cut to ``budget`` characters of content, and whether a trained turn was cut off.

    Keeps the start, as truncation does: the messages in order until the budget is spent, the
    one that spends it cut, the rest dropped (they lie past every token truncation keeps)."""
    if budget is None:
        return ex, False
    if ex.messages is None:
        if len(ex.text) <= budget:
            return ex, False
        return dataclasses.replace(ex, text=ex.text[:budget]), False
    left = budget
    for i, m in enumerate(ex.messages):
        if len(m["content"]) > left:
            msgs = ex.messages[:i] + [{**m, "content": m["content"][:left]}]
            lost = any(_trained(x) for x in ex.messages[i + 1 :])
            return dataclasses.replace(ex, messages=msgs), lost
        left -= len(m["content"])
    return ex, False
