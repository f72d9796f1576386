"""Tokenise examples with the model's chat template; mask everything but the assistant's turns.

The chat template renders the conversation; each segment (everything up to an assistant turn,
then the assistant turn itself) is tokenised on its own and the pieces are concatenated, so the
boundary between prompt and response is exact whatever the tokenizer merges. Only assistant
turns carry labels. Raw ``text`` examples train on every token (plus EOS).

When the tokenizer has no chat template, :data:`mixtune.data.template.DEFAULT_CHAT_TEMPLATE`
is used (a warning says so); ``model.chat_template`` overrides both.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np

from mixtune.data.formats import Example
from mixtune.data.template import DEFAULT_CHAT_TEMPLATE
from mixtune.errors import DataError

log = logging.getLogger(__name__)

IGNORE = -100
"""Label of a token not to learn (prompt, padding): the ``ignore_index`` of cross-entropy."""


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
    examples: list[Example], tokenizer, max_length: int, template: str, where: str
) -> Tokenized:
    """Tokenise ``examples``; raises :class:`DataError` when nothing trainable is left."""
    pieces: list[list[tuple[str, bool]]] = [
        _segments(ex, tokenizer, template, where) for ex in examples
    ]
    flat = [text for segs in pieces for text, _ in segs]
    ids_flat = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    eos = tokenizer.eos_token_id
    out = Tokenized()
    longest_prompt = 0
    j = 0
    for ex, segs in zip(examples, pieces):
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
    if out.n_dropped:
        log.warning(
            "%s: dropped %d example(s) whose prompt fills max_length=%d",
            where,
            out.n_dropped,
            max_length,
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
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, template, msgs[:i], True)
        full = _render(tokenizer, template, msgs[: i + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise DataError(
                f"{where}: the chat template does not render conversations prefix by prefix; "
                "set model.chat_template to one that does"
            )
        segs.append((prefix[len(done) :], False))
        segs.append((full[len(prefix) :], True))
        done = full
    tail = _render(tokenizer, template, msgs, False)[len(done) :]
    if tail:
        segs.append((tail, False))
    return [(t, tr) for t, tr in segs if t or tr]


def _render(tokenizer, template: str, msgs: list[dict], gen: bool) -> str:
    if not msgs and gen:
        msgs = []
    return tokenizer.apply_chat_template(
        msgs, chat_template=template, tokenize=False, add_generation_prompt=gen
    )
