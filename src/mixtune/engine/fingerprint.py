"""What a run's trajectory depends on: recorded at its first start, checked on every resume.

A fingerprint is a flat mapping of dotted keys to JSON values:

- the settings that decide what the run computes: ``seed``, ``max_steps``, the model's source,
  tokenizer, LoRA and resolved ``model.dtype``, the loss and the mixer with all their options
  (defaults included), the optimizer and schedule (``train.lr``, ``train.schedule``, ...),
  ``train.batch_size``, ``train.max_length``, and every dataset's and evaluation domain's
  options, keyed by name (``datasets.add.max_examples``);
- what the inputs turned out to be: ``model.content`` (what the base model's files hold, see
  :func:`of_model`), ``model.chat_template`` (a hash of the template in use) and, per dataset
  and evaluation domain, ``.examples`` (how many were selected) and ``.digest`` (a hash of the
  selected, tokenised examples; a streaming dataset hashes its first block, and ``.files`` the
  bytes of every local file it streams, so an edit anywhere in them is seen).

The content keys are computed by :mod:`mixtune.engine.content`: files through
:mod:`mixtune.filehash`, cached by (path, size, mtime, ctime), so a multi-GB model is read once,
not at every start; the examples with a few whole-array hashes (a million examples in well under
a second, ``bench/fingerprint_cost.py``).

Some keys may differ on resume because they cannot change what was or will be computed
(:data:`AMENDABLE`); ``max_steps`` may be raised when the learning-rate schedule does not depend
on it. Every other difference is refused: a resumed run would silently ignore it (the optimizer
state restores the old learning rate), apply it mid-run (a new seed re-draws the data subsets)
or fail halfway. A content key a run's record predates (:data:`INTRODUCED`: recorded since
this check exists) is accepted with a logged notice and recorded as an amendment, so existing
runs still resume and later resumes check it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import NamedTuple

from mixtune import config as config_mod
from mixtune import filehash, registry
from mixtune.data import streaming
from mixtune.data.tokenize import resolve_template
from mixtune.engine import content as content_mod
from mixtune.schema import MethodConfig

AMENDABLE = frozenset(
    {
        "progress",
        "report_to",
        "train.eval_every",
        "train.log_every",
        "train.save_every",
        "train.keep_checkpoints",
        "train.keep_evaluated",
        # Only decides which evaluated model final/ holds.
        "train.final_model",
        # The same update, up to float rounding: a step is normalised by its global token
        # count however it is split into micro-batches or sharded (engine/step.py), and
        # recomputing activations computes the same ones.
        "train.micro_batch_size",
        "train.micro_batch_tokens",
        # Packed or padded rows (recorded resolved: train.packing=auto -> true/false): the same
        # per-token losses up to float rounding (tests/test_packing.py).
        "train.packing",
        "train.gradient_checkpointing",
        # Where the per-token NLL comes from (full or chunked logits): the same values.
        "train.logits",
        "train.logits_chunk",
        "train.fsdp",
        # Which attention kernel computes the same attention (sdpa, eager, flash-attention).
        "model.attn_implementation",
        # Only decide whether a non-finite step stops the run.
        "train.nonfinite",
        "train.max_nonfinite",
    }
)
"""Keys a resume may change; the change is recorded as an amendment (``amendments.jsonl``)."""

log = logging.getLogger(__name__)

UNRECORDED = ("output_dir", "resume")
"""Where the run lives and how it was started: not part of what it computes."""


class Change(NamedTuple):
    key: str
    old: object
    new: object


ABSENT = "(absent)"

INTRODUCED = ("model.content", "datasets.*.files")
"""Content keys recorded since run.json first existed: a record without one accepts the resume
(with a notice) instead of refusing it, and the value is recorded as an amendment."""


def of_settings(cfg: config_mod.RunConfig) -> dict:
    """The settings part of the fingerprint: what ``cfg`` alone says."""
    raw = config_mod.to_dict(cfg)
    for key in UNRECORDED:
        raw.pop(key)
    raw["mixer"], raw["loss"] = _method(cfg.mixer), _method(cfg.loss)
    out: dict = {}
    for section in ("datasets", "evals"):
        entries = raw.pop(section)
        out[section] = [e["name"] for e in entries]
        for e in entries:
            _flat({k: v for k, v in e.items() if k != "name"}, f"{section}.{e['name']}.", out)
    _flat(raw, "", out)
    return _plain(out)


class Fingerprint(dict):
    """A run's fingerprint (a plain mapping, as ``run.json`` stores it) and, in ``legacy``, how
    to compute a content key the way older records did (``{key: () -> value}``): the digests
    of the examples, which :func:`compare` computes only against a record that holds the old
    kind."""

    legacy: dict = {}


def of_run(cfg: config_mod.RunConfig, tokenizer, train_sets, domains) -> Fingerprint:
    """The whole fingerprint of a run about to start: settings plus what the inputs hold."""
    from mixtune.engine.build import pick_dtype

    out = of_settings(cfg)
    out["model.dtype"] = str(pick_dtype(cfg.model.dtype, cfg.model.lora.enabled)).removeprefix(
        "torch."
    )
    template = resolve_template(tokenizer, cfg.model.chat_template, quiet=True)
    if not isinstance(template, str):  # a tokenizer may hold several named templates
        template = json.dumps(template, sort_keys=True, default=str)
    out["model.chat_template"] = hashlib.blake2b(template.encode(), digest_size=8).hexdigest()
    model = content_mod.of_model(cfg.model)
    if model is not None:
        out["model.content"] = model
    legacy = {}
    sets = [(f"datasets.{t.name}", t) for t in train_sets]
    sets += [(f"evals.{d.name}", d) for d in domains]
    for where, t in sets:
        out[f"{where}.examples"] = int(t.size) if where.startswith("datasets.") else len(t.data)
        files = streaming.content_files(t)
        if files:
            out[f"{where}.files"] = content_mod.short(filehash.of_files(files))
        if isinstance(t, streaming.StreamSet):  # its first block (as ever: small)
            out[f"{where}.digest"] = streaming.content_digest(t)
            continue
        columns = (t.data.input_ids, t.data.labels, t.data.answers)
        out[f"{where}.digest"] = content_mod.examples_digest(*columns)
        legacy[f"{where}.digest"] = lambda columns=columns: content_mod.legacy_digest(*columns)
    fp = Fingerprint(_plain(out))
    fp.legacy = legacy
    return fp


def compare(
    old: dict, new: dict, cfg: config_mod.RunConfig, data_checked: bool = True
) -> tuple[list[Change], list[Change]]:
    """``(refused, amended)``: the keys whose value differs between the recorded fingerprint
    ``old`` and ``new`` (of ``cfg``). A setting the record predates counts as unchanged while it
    keeps its default. ``data_checked``: the digests are compared too, so a data file may have
    moved (a changed ``.path`` with the same content is an amendment)."""
    refused, amended = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, ABSENT), new.get(key, ABSENT)
        if a == b or (key not in old and b == _default(cfg, key)):
            continue
        change = Change(key, a, b)
        if _older_digest(a, b) and key in getattr(new, "legacy", {}):
            # Recorded with the per-example digest: compute that one (once; the new kind is
            # recorded as an amendment), and compare like with like.
            if new.legacy[key]() == a:
                amended.append(change)
            else:
                refused.append(change)
            continue
        if key not in old and _introduced(key):
            log.warning(
                "the run's record predates the %s check: resuming without it (recorded now, so "
                "later resumes check it)",
                key,
            )
            amended.append(change)
            continue
        moved = (
            data_checked
            and key.startswith(("datasets.", "evals."))
            and key.endswith(".path")
            and key.count(".") == 2
        )
        extends = key == "max_steps" and _extends(a, b, new) and length_bound(cfg) is None
        if key in AMENDABLE or moved or extends:
            amended.append(change)
        else:
            refused.append(change)
    return refused, amended


def _older_digest(old, new) -> bool:
    """An examples digest recorded before :func:`content.examples_digest`, against one made by
    it."""
    v2 = content_mod.V2
    return (
        isinstance(old, str)
        and isinstance(new, str)
        and new.startswith(v2)
        and not (old.startswith(v2))
    )


def _introduced(key: str) -> bool:
    return key == "model.content" or (key.startswith("datasets.") and key.endswith(".files"))


def length_bound(cfg: config_mod.RunConfig) -> str | None:
    """Why this run's mixer or loss needs ``max_steps`` fixed from the start (capability
    ``fixed_length`` in its ``requires``: e.g. a schedule scaled to the run length), or None."""
    for reg, section in ((registry.MIXERS, cfg.mixer), (registry.LOSSES, cfg.loss)):
        why = registry.requirements(reg[section.name], section.options).get("fixed_length")
        if why:
            return why
    return None


def describe(changes: list[Change], most: int = 8, cfg: config_mod.RunConfig | None = None) -> str:
    """``key old -> new`` for each change, on one line."""
    parts = [f"{c.key} {_show(c.old)} -> {_show(c.new)}" for c in changes[:most]]
    if len(changes) > most:
        parts.append(f"and {len(changes) - most} more")
    text = "; ".join(parts)
    if any(c.key == "max_steps" for c in changes):
        text += (
            " (max_steps can only be raised, and only with train.schedule=constant and no "
            "train.warmup_ratio: otherwise the schedule is stretched over it"
        )
        bound = length_bound(cfg) if cfg is not None else None
        text += f"; and {bound})" if bound else ")"
    return text


def _extends(old, new, fp: dict) -> bool:
    """Raising max_steps is safe when the learning rate does not depend on it."""
    warmup_fixed = fp.get("train.warmup_steps", 0) > 0 or fp.get("train.warmup_ratio", 0) == 0
    return (
        isinstance(old, int)
        and isinstance(new, int)
        and new > old
        and fp.get("train.schedule") == "constant"
        and warmup_fixed
    )


def _default(cfg: config_mod.RunConfig, key: str):
    """The schema's default for the setting ``key`` names in ``cfg`` (ABSENT if it has none)."""
    obj, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if isinstance(obj, tuple):  # datasets or evals, by name
            obj = next((x for x in obj if x.name == part), None)
            continue
        if isinstance(obj, MethodConfig):
            obj = obj.options
        known = {f.name: f for f in dataclasses.fields(obj)} if _is_config(obj) else {}
        if part not in known:
            return ABSENT
        if i < len(parts) - 1:
            obj = getattr(obj, part)
        elif known[part].default is not dataclasses.MISSING:
            return _plain([config_mod.to_dict(known[part].default)])[0]
        elif known[part].default_factory is not dataclasses.MISSING:
            return _plain([config_mod.to_dict(known[part].default_factory())])[0]
    return ABSENT


def _is_config(obj) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _method(m) -> dict:
    """A mixer's or loss's name and its parsed options (defaults filled in), else as written."""
    options = config_mod.to_dict(m.options) if m.options is not None else m.params
    return {"name": m.name, **(options if isinstance(options, dict) else {"options": options})}


def _flat(d: dict, prefix: str, out: dict) -> None:
    for k, v in d.items():
        if isinstance(v, dict) and v:
            _flat(v, f"{prefix}{k}.", out)
        else:
            out[f"{prefix}{k}"] = v


def _plain(x):
    """``x`` as it reads back from ``run.json`` (tuples become lists, other objects strings)."""
    return json.loads(json.dumps(x, default=str))


def _show(v) -> str:
    text = v if isinstance(v, str) else json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."
