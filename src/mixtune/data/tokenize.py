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

Speed (half the CPU time of rendering each prefix through ``apply_chat_template``, and shared
among processes; BENCHMARKS.md): the template is compiled once and rendered directly
(:class:`Renderer`: the same text as ``apply_chat_template``, without its per-call overhead);
the segments of each chunk of :data:`CHUNK` examples are tokenised in one batched call
(:func:`encode`); and a large input is shared among worker processes (:func:`pool_size`,
``$MIXTUNE_TOKENIZE_WORKERS``), whose parts come back in order, so the result never depends on
the count. A progress line is logged every :data:`PROGRESS_SECONDS`; an error names the example
(its position in ``examples``).

When the tokenizer has no chat template, :data:`mixtune.data.template.DEFAULT_CHAT_TEMPLATE`
is used (a warning says so); ``model.chat_template`` overrides both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import multiprocessing
import os
import threading
import time
import weakref
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np

from mixtune.data import token_cache
from mixtune.data.formats import Example
from mixtune.data.template import DEFAULT_CHAT_TEMPLATE
from mixtune.data.tools import check_tools
from mixtune.errors import ConfigError, DataError

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
        if not self.labels:
            return np.zeros(0, np.int64)
        # All examples at once (a loop over 100,000 examples costs a third of a second).
        lengths = np.fromiter(map(len, self.labels), np.int64, len(self.labels))
        ends = np.cumsum(lengths)
        starts = ends - lengths
        trained = np.concatenate(self.labels) != IGNORE
        trained[starts[starts < ends]] = False  # position 0 predicts nothing
        total = np.concatenate([[0], np.cumsum(trained, dtype=np.int64)])
        return total[ends] - total[starts]


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
    workers: int | None = None,
) -> Tokenized:
    """Tokenise ``examples``; raises :class:`DataError` when nothing trainable is left.

    ``cache``: reuse (and store) the result in the token cache (:mod:`mixtune.data.token_cache`),
    keyed by the examples, the tokenizer, the template and ``max_length``. ``workers``: the
    processes that render and tokenise (default: :func:`pool_size`); the result is the same
    whatever the count."""
    entry = token_cache.key(examples, tokenizer, template, max_length) if cache else None
    hit = token_cache.load(entry) if entry else None
    out = Tokenized(**hit) if hit is not None else None
    if out is None:
        out = _tokenize(examples, tokenizer, max_length, template, where, workers)
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
    examples: list[Example],
    tokenizer,
    max_length: int,
    template: str,
    where: str,
    workers: int | None = None,
) -> Tokenized:
    budget = char_budget(tokenizer, max_length)
    capped = [_cap(ex, budget) for ex in examples]
    examples = [ex for ex, _ in capped]
    check_tools(examples, tokenizer, template, where)
    job = _Job(
        examples=examples,
        lost=[lost for _, lost in capped],
        render=Renderer(tokenizer, template, where),
        tokenizer=tokenizer,
        max_length=max_length,
        where=where,
    )
    n_workers = pool_size(len(examples), workers)
    parts: list[_Part] = []
    t0 = last = time.perf_counter()
    for part in _run(job, n_workers):
        parts.append(part)
        if (now := time.perf_counter()) - last > PROGRESS_SECONDS:  # long work: progress
            done = sum(p.n for p in parts)
            log.info(
                "%s: tokenised %d/%d examples (%.0f s, %d process(es))",
                where,
                done,
                len(examples),
                now - t0,
                n_workers,
            )
            last = now
    out = Tokenized()
    kept = np.concatenate([p.kept for p in parts])
    ends = np.cumsum(np.concatenate([p.lengths for p in parts]))
    cuts = ends[:-1]
    out.input_ids = np.split(np.concatenate([p.ids for p in parts]), cuts) if len(kept) else []
    out.labels = np.split(np.concatenate([p.labels for p in parts]), cuts) if len(kept) else []
    out.prompt_len = np.concatenate([p.prompt_len for p in parts]).tolist()
    out.answers = [examples[i].answer for i in kept.tolist()]
    out.n_truncated = sum(p.n_truncated for p in parts)
    out.n_dropped = sum(p.n_dropped for p in parts)
    if not out.input_ids:
        longest_prompt = max((p.longest_prompt for p in parts), default=0)
        raise DataError(
            f"{where}: no example has a response token within train.max_length={max_length} "
            f"(longest prompt: {longest_prompt} tokens); raise train.max_length or shorten prompts"
        )
    return out


# ----------------------------------------------------------------------------------------------
# The work, in chunks of examples: render, tokenise in one batched call, assemble


@dataclass
class _Job:
    """Everything a chunk of work reads (a forked worker inherits it; nothing is pickled)."""

    examples: list[Example]
    lost: list[bool]  # the final trained turn was cut off by the character cut (_cap)
    render: Renderer
    tokenizer: object
    max_length: int
    where: str


@dataclass
class _Part:
    """The tokenised examples of one chunk, concatenated (cheap to send back from a worker)."""

    n: int  # examples in the chunk
    ids: np.ndarray  # (sum of lengths,) int64: the kept examples' tokens, one after another
    labels: np.ndarray  # (sum of lengths,) int64
    lengths: np.ndarray  # (kept,) int64
    prompt_len: np.ndarray  # (kept,) int64
    kept: np.ndarray  # (kept,) int64: indices into the job's examples
    n_truncated: int
    n_dropped: int
    longest_prompt: int


def _chunk(job: _Job, start: int, stop: int) -> _Part:
    """Tokenise examples ``start:stop`` of ``job``: each one's segments rendered, all of the
    chunk's segments tokenised in one batched call, then concatenated per example, labelled,
    truncated at ``max_length`` (an example with no trained token left is dropped)."""
    pieces = [
        _segments(job.examples[i], job.render, f"{job.where}: example {i}")
        for i in range(start, stop)
    ]
    ids_flat = encode(job.tokenizer, [text for segs in pieces for text, _ in segs])
    bos, eos = _bos(job.tokenizer), job.tokenizer.eos_token_id
    all_ids: list[int] = []
    all_labels: list[int] = []
    lengths, prompt_lens, kept = [], [], []
    n_truncated = n_dropped = longest_prompt = 0
    j = 0
    for i, segs in zip(range(start, stop), pieces):
        ids: list[int] = []
        labels: list[int] = []
        prompt_len = 0
        for _, trained in segs:
            seg = ids_flat[j]
            j += 1
            if trained:
                prompt_len = len(ids)
            ids.extend(seg)
            labels.extend(seg if trained else [IGNORE] * len(seg))
        if job.examples[i].messages is None:
            if bos:
                ids, labels = [bos] + ids, [IGNORE] + labels
            if eos is not None:
                ids.append(eos)
                labels.append(eos)
        if job.lost[i]:  # the final trained turn was cut off: it starts past every kept token
            prompt_len = len(ids)
        longest_prompt = max(longest_prompt, prompt_len)
        if len(ids) > job.max_length:
            n_truncated += 1
            ids, labels = ids[: job.max_length], labels[: job.max_length]
        if all(lab == IGNORE for lab in labels[1:]):
            n_dropped += 1
            continue
        all_ids.extend(ids)
        all_labels.extend(labels)
        lengths.append(len(ids))
        prompt_lens.append(prompt_len)
        kept.append(i)
    return _Part(
        n=stop - start,
        ids=np.asarray(all_ids, np.int64),
        labels=np.asarray(all_labels, np.int64),
        lengths=np.asarray(lengths, np.int64),
        prompt_len=np.asarray(prompt_lens, np.int64),
        kept=np.asarray(kept, np.int64),
        n_truncated=n_truncated,
        n_dropped=n_dropped,
        longest_prompt=longest_prompt,
    )


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """The token ids of each text, without special tokens added: ``tokenizer(texts,
    add_special_tokens=False)["input_ids"]``, in one batched call.

    A plain ``tokenizers``-backed tokenizer is called through its Rust backend directly: the
    same ids, without building a Python dict per text (a third of the tokenising time)."""
    if not texts:
        return []
    backend = _plain_backend(tokenizer)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def _plain_backend(tokenizer):
    """The ``tokenizers.Tokenizer`` that ``tokenizer(texts, add_special_tokens=False)`` would
    call with nothing done around it, or None (another tokenizer class, or a backend set up to
    truncate, pad or split special tokens differently: the transformers call handles those)."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    if getattr(type(tokenizer), "_encode_plus", None) is not TokenizersBackend._encode_plus:
        return None
    if hasattr(tokenizer, "_switch_to_input_mode"):
        return None
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:
        return None
    if backend.encode_special_tokens != bool(tokenizer.split_special_tokens):
        return None
    if not hasattr(backend, "encode_batch_fast"):
        return None
    return backend


# ----------------------------------------------------------------------------------------------
# Worker processes

CHUNK = 2000
"""Examples per unit of work: one batched tokenizer call, one task of a worker process."""
POOL_MIN = 20_000
"""Fewer examples than this are tokenised in this process: a worker pool costs about 0.1 s
to start, and below this the work it would share is about a second."""
PROGRESS_SECONDS = 5.0
"""A progress line is logged when tokenising has run this long since the last one."""

_FORKED: _Job | None = None  # the job a forked worker inherits


def pool_size(n_examples: int, workers: int | None = None) -> int:
    """How many processes tokenise ``n_examples``: ``workers`` if given, else
    ``$MIXTUNE_TOKENIZE_WORKERS``, else the CPUs this process may use (shared among the local
    ranks of a distributed run). One (no pool) below :data:`POOL_MIN` examples, off the main
    thread, or where processes cannot be forked (the workers inherit the tokenizer and template
    instead of re-loading them)."""
    if workers is None:
        env = os.environ.get("MIXTUNE_TOKENIZE_WORKERS", "").strip()
        if env:
            if not env.isdigit() or int(env) < 1:
                raise ConfigError(
                    f"MIXTUNE_TOKENIZE_WORKERS: expected a whole number >= 1, got {env!r}"
                )
            workers = int(env)
        else:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
            ranks = os.environ.get("LOCAL_WORLD_SIZE", "")
            workers = max(1, cpus // max(1, int(ranks) if ranks.isdigit() else 1))
    if workers < 1:
        raise ConfigError(f"tokenize workers: expected a whole number >= 1, got {workers}")
    if (
        n_examples < POOL_MIN
        or threading.current_thread() is not threading.main_thread()
        or "fork" not in multiprocessing.get_all_start_methods()
    ):
        return 1
    return min(workers, -(-n_examples // CHUNK))


def _run(job: _Job, workers: int):
    """The job's parts, in order: computed here, or by ``workers`` forked processes."""
    spans = [(a, min(a + CHUNK, len(job.examples))) for a in range(0, len(job.examples), CHUNK)]
    if workers <= 1:
        for a, b in spans:
            yield _chunk(job, a, b)
        return
    global _FORKED
    _FORKED = job
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    # ``tokenizers`` warns in a forked child once its thread pool has been used, unless
    # TOKENIZERS_PARALLELISM is set; each worker tokenises on one thread anyway.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        parts = pool.map(_forked_chunk, spans)  # submits every span: the workers fork here
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    try:
        yield from parts
    except BrokenProcessPool:
        raise RuntimeError(
            f"{job.where}: a tokenising worker process died (out of memory?); "
            "MIXTUNE_TOKENIZE_WORKERS=1 tokenises in this process"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _FORKED = None


def _forked_chunk(span: tuple[int, int]) -> _Part:
    return _chunk(_FORKED, *span)


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


def _segments(ex: Example, render: Renderer, where: str) -> list[tuple[str, bool]]:
    """``[(text, trained), ...]`` covering the rendered conversation.

    Each trained turn costs two renders: the conversation up to it with the generation prompt
    (where its tokens start) and up to its end (where they stop); when the last message is
    trained, its end is the whole conversation. ``where`` names the example in errors."""
    if ex.messages is None:
        return [(ex.text, True)]
    msgs = ex.messages
    fast = render.accepts(ex)
    segs: list[tuple[str, bool]] = []
    done = ""
    try:
        for i, m in enumerate(msgs):
            if not _trained(m):
                continue
            prefix = render(msgs[:i], True, ex.tools, fast)
            full = render(msgs[: i + 1], False, ex.tools, fast)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise DataError(
                    f"{where}: the chat template does not render conversations prefix by "
                    "prefix; set model.chat_template to one that does"
                )
            segs.append((prefix[len(done) :], False))
            segs.append((full[len(prefix) :], True))
            done = full
        # When the last message is trained, ``done`` already is the whole conversation.
        last_trained = bool(segs) and _trained(msgs[-1])
        tail = "" if last_trained else render(msgs, False, ex.tools, fast)[len(done) :]
    except DataError:
        raise
    except Exception as e:  # the template raised (raise_exception) or failed on this record
        first = str(msgs[0].get("content", ""))[:40] if msgs else ""
        raise DataError(
            f"{where} ({first!r}...): the chat template cannot render it: {type(e).__name__}: {e}"
        ) from None
    if tail:
        segs.append((tail, False))
    return [(t, tr) for t, tr in segs if t or tr]


def _trained(m: dict) -> bool:
    return m["role"] == "assistant" and m.get("weight", 1) != 0


class Renderer:
    """Renders a conversation as ``tokenizer.apply_chat_template(..., tokenize=False)`` does,
    without its per-call overhead (two thirds of a render of a short conversation).

    The template is compiled once by transformers' own compiler (the same sandboxed jinja
    environment, filters, globals and ``{% generation %}`` tag, so the text is the same), and
    rendered with what ``apply_chat_template`` passes it: the messages, ``tools``,
    ``documents=None``, ``add_generation_prompt`` and the tokenizer's special tokens. The
    conversions ``apply_chat_template`` makes first (dropping keys whose value is None,
    copying rich objects into plain data, aliasing reasoning fields) change nothing on plain
    JSON data without those keys; an example that is not such data (:meth:`accepts`), a
    template that is not one string, or a transformers without that compiler is rendered by
    ``apply_chat_template`` itself.
    """

    def __init__(self, tokenizer, template, where: str = "data"):
        self.tokenizer = tokenizer
        self.template = template
        self.compiled = None
        self.globals: dict = {}
        self.context: dict = {}
        special = dict(getattr(tokenizer, "special_tokens_map", {}))
        if not isinstance(template, str) or not _plain(special):
            return
        try:
            from jinja2.runtime import new_context
            from transformers.utils.chat_template_utils import _compile_jinja_template
        except ImportError:  # a transformers without it: apply_chat_template renders
            return
        self.new_context = new_context
        try:
            self.compiled = _compile_jinja_template(template)
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
            raise DataError(
                f"{where}: the chat template does not compile ({why}); fix model.chat_template"
            ) from None
        # Template.render(**kw) merges the template's globals (a ChainMap) into a new dict on
        # every call, a third of a short render: merge them once and render a shared context.
        self.globals = dict(self.compiled.globals)
        self.context = {**self.globals, **special}

    def accepts(self, ex: Example) -> bool:
        """Whether the compiled template may render ``ex`` directly (see the class)."""
        if self.compiled is None:
            return False
        for m in ex.messages or ():
            if type(m) is not dict or not m.keys().isdisjoint(_REASONING):
                return False
            for k, v in m.items():  # string values (the common case) checked inline
                if type(k) is not str or v is None or (type(v) is not str and not _plain(v)):
                    return False
        return ex.tools is None or _plain(ex.tools)

    def _render(self, msgs: list[dict], gen: bool, tools) -> str:
        """``self.compiled.render(messages=msgs, tools=tools, documents=None,
        add_generation_prompt=gen, **special_tokens)``, as jinja's ``Template.render`` does it."""
        t = self.compiled
        env = t.environment
        context = {
            **self.context,
            "messages": msgs,
            "tools": tools,
            "documents": None,
            "add_generation_prompt": gen,
        }
        ctx = self.new_context(env, t.name, t.blocks, context, True, self.globals)
        try:
            return env.concat(t.root_render_func(ctx))
        except Exception:
            env.handle_exception()  # re-raises with the template's line in the traceback

    def __call__(self, msgs: list[dict], gen: bool, tools=None, fast: bool = False) -> str:
        if not msgs:  # apply_chat_template refuses an empty conversation
            raise ValueError("Cannot apply chat template to an empty conversation")
        if fast:
            return self._render(msgs, gen, tools or None)
        extra = {"tools": tools} if tools else {}
        return self.tokenizer.apply_chat_template(
            msgs, chat_template=self.template, tokenize=False, add_generation_prompt=gen, **extra
        )


_REASONING = frozenset(("reasoning_content", "thinking", "reasoning"))
"""Message keys ``apply_chat_template`` copies under each other's names before rendering."""
_SCALARS = (str, int, float, bool, type(None))


def _plain(value) -> bool:
    """Whether ``value`` is plain JSON-like data (exact built-in types; dicts with string keys)
    that ``apply_chat_template`` would pass to the template unchanged."""
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is list:
        return all(_plain(v) for v in value)
    if kind is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    return False


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
