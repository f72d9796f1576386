"""``mixtune inspect CONFIG``: what the data of a run looks like to the model, before any training.

What LLaMA-Factory and axolotl users check before spending GPU hours, per training dataset and
per evaluation domain: the record format detected, how many records there are and how many
examples survive (dropped: no supervised token left within ``train.max_length``; truncated:
cut at it), token length percentiles, the share of tokens that are supervised, the share of a
batch that would be padding, and rendered examples with the supervised spans marked.

It runs the data path of ``mixtune train`` itself (:func:`mixtune.data.domains.build`: the
same reading, holdout, budgets and tokenisation), so what it shows is what training would see;
it loads only the tokenizer, never model weights, and writes nothing (no run directory). A
``streaming: true`` dataset is described by its first block (what the stream reads before the
first step; its record count is the source's), not read whole.

A plan config (``run:``, e.g. configs/mergemix.yaml) is inspected through its run config; a
continual config (``stages:``, e.g. configs/proxymix.yaml) through every task of its stages
(each task at its own ``max_examples``, its evaluation domain, and the safety buffer and
domain), with the sections that do not describe data (``learn:``...) left unread.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixtune import config as config_mod
from mixtune import rawconfig
from mixtune.config import MethodConfig, RunConfig
from mixtune.data import domains as data_domains
from mixtune.data.formats import detect, rename_fields
from mixtune.data.tokenize import IGNORE, Tokenized, resolve_template
from mixtune.errors import ConfigError

log = logging.getLogger(__name__)

OPEN, CLOSE = "[[", "]]"
"""Marks around supervised text when colour is off."""
COLOR, RESET = "\033[1;32m", "\033[0m"
"""Bold green for supervised text in a terminal."""


@dataclass
class Entry:
    """One training dataset or evaluation domain, as ``mixtune inspect`` reports it."""

    kind: str  # dataset | eval
    name: str
    source: str  # path, or "held out of <dataset>"
    format: str
    records: int  # raw records of the source (for a holdout: of the dataset it comes from)
    selected: int  # examples tokenised (after holdout, max_examples, evaluation batches)
    dropped: int
    truncated: int
    lengths: dict[str, int]  # p50 / p90 / p99 / max tokens of the kept examples
    supervised_share: float  # supervised tokens / tokens
    padding_share: float  # padding / (padded batch area), batches as training forms them
    batch_size: int
    examples: list[list[tuple[str, bool]]] = field(default_factory=list)  # [(text, supervised)]
    streamed: bool = False  # described by the stream's first block only


def load_config(path: str | Path, overrides=()) -> RunConfig:
    """The run config to inspect in a run, plan or continual YAML."""
    raw = rawconfig.read_yaml(path)
    if "stages" in raw:
        return _continual_run(raw, overrides)
    if "run" in raw and "datasets" not in raw:
        raw = copy.deepcopy(raw)
        if isinstance(raw["run"], str):  # a path, relative to the plan file when not found
            p = Path(raw["run"])
            if not p.is_absolute() and not p.is_file():
                p = Path(path).parent / p
            raw["run"] = rawconfig.read_yaml(p)
        for item in overrides:
            rawconfig.apply_override(raw, item)
        if not isinstance(raw["run"], dict):
            raise ConfigError("run: must be a train YAML path or an inline run config")
        return config_mod.load(data=raw["run"])
    return config_mod.load(path, overrides)


def _continual_run(raw: dict, overrides) -> RunConfig:
    """One run config over every task of a continual config (see the module docstring)."""
    from mixtune.continual import config as continual_config
    from mixtune.continual.stages import stage_config

    raw = copy.deepcopy(raw)
    for item in overrides:
        rawconfig.apply_override(raw, item)
    known = {f.name for f in dataclasses.fields(continual_config.ContinualConfig)}
    if unread := sorted(set(raw) - known):
        log.info("inspect: sections not about data left unread: %s", ", ".join(unread))
    cc = continual_config.load(data={k: v for k, v in raw.items() if k in known})
    mixer = MethodConfig(cc.mixer.name, dict(cc.mixer.params))
    stages = [stage_config(cc, (t.name,), 0, mixer) for t in cc.stages]
    # each task's own data and domain first (in stage order), then what every stage shares
    # (the safety buffer and domain)
    datasets = {s.datasets[0].name: s.datasets[0] for s in stages}
    datasets.update({d.name: d for s in stages for d in s.datasets[1:]})
    evals = {s.evals[0].name: s.evals[0] for s in stages}
    evals.update({e.name: e for s in stages for e in s.evals[1:]})
    return dataclasses.replace(
        stages[0], datasets=tuple(datasets.values()), evals=tuple(evals.values())
    )


def inspect_run(cfg: RunConfig, n_examples: int = 1) -> list[Entry]:
    """Read and tokenise every dataset and evaluation domain of ``cfg`` as training would (no
    model weights, nothing written); one :class:`Entry` each, datasets first."""
    from mixtune.engine import build

    t0 = time.perf_counter()
    tokenizer = build.load_tokenizer(cfg.model)
    log.info("inspect: tokenizer loaded in %.1f s (no model weights)", time.perf_counter() - t0)
    raw: dict[str, tuple[int, str]] = {}  # where -> (records, format)

    def seen(where: str, records: list[dict]) -> None:
        kind, name = where.split(".", 1)
        src = next(s for s in getattr(cfg, kind) if s.name == name)
        raw[where] = (len(records), _format(records[0], src.format, src.fields))

    # Streams are opened below, on their own; domains.build reads the in-memory rest.
    in_memory = tuple(d for d in cfg.datasets if not d.streaming)
    memory = dataclasses.replace(cfg, datasets=in_memory) if in_memory else _no_datasets(cfg)
    train, evals = data_domains.build(memory, tokenizer, on_records=seen)
    held = {t.name: t for t in train}
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    out = []
    for k, d in enumerate(cfg.datasets):
        if d.streaming:
            n, data = _first_block(cfg, d, k, tokenizer)
            fmt = d.format if d.format != "auto" else "auto (streamed)"
        else:
            (n, fmt), data = raw[f"datasets.{d.name}"], held[d.name].data
        order = np.random.default_rng(cfg.seed).permutation(len(data))
        e = _entry("dataset", d.name, d.path, fmt, n, data, order, micro, n_examples, tokenizer)
        e.streamed = d.streaming
        out.append(e)
    for e, dom in zip(cfg.evals, evals):
        if e.from_dataset is not None:
            (n, fmt), source = raw[f"datasets.{e.from_dataset}"], f"held out of {e.from_dataset}"
        else:
            (n, fmt), source = raw[f"evals.{e.name}"], e.path
        order = np.arange(len(dom.data))  # evaluation batches are fixed, in this order
        out.append(
            _entry(
                "eval", e.name, source, fmt, n, dom.data, order, e.batch_size, n_examples, tokenizer
            )
        )
    return out


def _no_datasets(cfg: RunConfig):
    """``cfg`` for :func:`~mixtune.data.domains.build` when every dataset streams (a RunConfig
    needs one): build reads only these fields, as in :func:`mixtune.data.streaming.build`."""
    from types import SimpleNamespace

    return SimpleNamespace(
        model=cfg.model, train=cfg.train, seed=cfg.seed, evals=cfg.evals, datasets=()
    )


def _first_block(cfg: RunConfig, d, k: int, tokenizer) -> tuple[int, Tokenized]:
    """A streaming dataset's size and the tokenised examples of its first block."""
    from mixtune.data.streaming.dataset import open_stream

    template = resolve_template(tokenizer, cfg.model.chat_template, quiet=True)
    s = open_stream(d, k, cfg.seed, tokenizer, template, cfg.train.max_length)
    first = s.stream.loaded(0)
    rows = [s.stream.cache[first.head[4] + i] for i in range(first.n)]
    data = Tokenized(
        input_ids=[r[0] for r in rows],
        labels=[r[1] for r in rows],
        prompt_len=[r[2] for r in rows],
        answers=[r[3] for r in rows],
        # (a stream keeps no count: an example at exactly max_length is counted as cut)
        n_truncated=sum(len(r[0]) >= cfg.train.max_length for r in rows),
    )
    return s.size, data


def _format(first: dict, fmt: str, fields: dict | None) -> str:
    """The format :func:`mixtune.data.formats.normalize` reads the records in: the configured
    one, or the one detected from the first record after ``fields`` renames it."""
    if fmt != "auto":
        return fmt
    return detect(rename_fields(first, fields) if fields else first)


def _entry(
    kind: str,
    name: str,
    source: str,
    fmt: str,
    records: int,
    data: Tokenized,
    order: np.ndarray,
    batch_size: int,
    n_examples: int,
    tokenizer,
) -> Entry:
    lengths = np.array([len(x) for x in data.input_ids], np.int64)
    pct = np.percentile(lengths, [50, 90, 99]) if len(lengths) else np.zeros(3)
    return Entry(
        kind=kind,
        name=name,
        source=source,
        format=fmt,
        records=records,
        selected=len(data) + data.n_dropped,
        dropped=data.n_dropped,
        truncated=data.n_truncated,
        lengths={
            "p50": round(float(pct[0])),
            "p90": round(float(pct[1])),
            "p99": round(float(pct[2])),
            "max": int(lengths.max(initial=0)),
        },
        supervised_share=int(data.label_counts.sum()) / max(1, int(lengths.sum())),
        padding_share=padding_share(lengths[order], batch_size),
        batch_size=batch_size,
        examples=[spans(data, int(i), tokenizer) for i in order[:n_examples]],
    )


def padding_share(lengths: np.ndarray, batch_size: int) -> float:
    """Share of the padded batch area that is padding when ``lengths`` (in batch order) are cut
    into batches of ``batch_size`` and each is right-padded to its longest, as
    :func:`mixtune.data.collate.collate` does. The last batch may be smaller."""
    area = real = 0
    for i in range(0, len(lengths), batch_size):
        b = lengths[i : i + batch_size]
        area += int(b.max()) * len(b)
        real += int(b.sum())
    return (area - real) / area if area else 0.0


def spans(data: Tokenized, i: int, tokenizer) -> list[tuple[str, bool]]:
    """Example ``i`` as ``[(text, supervised), ...]`` runs of tokens. A token is supervised when
    it carries a label the loss counts (positions t >= 1: the first token is never predicted),
    so the marks show what training learns, whatever the template or truncation did."""
    ids, labels = data.input_ids[i], data.labels[i]
    trained = labels != IGNORE
    trained[0] = False
    runs: list[tuple[list[int], bool]] = []
    for tok, tr in zip(ids.tolist(), trained.tolist()):
        if runs and runs[-1][1] == tr:
            runs[-1][0].append(tok)
        else:
            runs.append(([tok], tr))
    return [(tokenizer.decode(t, skip_special_tokens=False), tr) for t, tr in runs]


def render(runs: list[tuple[str, bool]], color: bool) -> str:
    """Runs as text, the supervised ones coloured (``color``) or in ``[[...]]``."""
    mark = (COLOR, RESET) if color else (OPEN, CLOSE)
    return "".join(f"{mark[0]}{t}{mark[1]}" if tr else t for t, tr in runs)


# ----------------------------------------------------------------------------------------------
# Output


def as_json(cfg: RunConfig, entries: list[Entry]) -> dict:
    """Everything :func:`inspect_run` found, as plain data (``mixtune inspect --json``)."""
    return {
        "tokenizer": cfg.model.tokenizer or cfg.model.name_or_path,
        "max_length": cfg.train.max_length,
        "entries": [
            {
                **dataclasses.asdict(e),
                "examples": [[{"text": t, "supervised": tr} for t, tr in ex] for ex in e.examples],
            }
            for e in entries
        ],
    }


def table(cfg: RunConfig, entries: list[Entry], color: bool = False) -> str:
    """The human-readable report: one row per dataset and domain, then the examples."""
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    lines = [
        f"tokenizer: {cfg.model.tokenizer or cfg.model.name_or_path} (no model weights loaded)",
        f"max_length: {cfg.train.max_length}; padding as in batches of {micro} (evaluation: "
        "each domain's batch_size), right-padded to the longest",
        "",
        f"{'':<8} {'name':<16} {'format':<16} {'records':>8} {'used':>7} {'dropped':>7} "
        f"{'trunc':>6} {'p50':>5} {'p90':>5} {'p99':>5} {'max':>5} {'superv':>7} {'padding':>7}",
    ]
    for e in entries:
        n = e.lengths
        used = e.selected - e.dropped
        lines.append(
            f"{e.kind:<8} {e.name:<16} {e.format:<16} {e.records:>8} {used:>7} {e.dropped:>7} "
            f"{e.truncated:>6} {n['p50']:>5} {n['p90']:>5} {n['p99']:>5} {n['max']:>5} "
            f"{e.supervised_share:>7.1%} {e.padding_share:>7.1%}"
        )
    notes = [
        "records: in the source; used: examples kept (after holdout, max_examples, evaluation "
        "batches and dropping);",
        "trunc: cut at max_length (dropped ones included); superv: supervised / all tokens; "
        "padding: share of the padded batch area",
    ]
    if any(e.streamed for e in entries):
        notes.append("streaming datasets: used, lengths and shares are of the first block only")
    lines += ["", *notes]
    marks = "in colour" if color else f"in {OPEN}...{CLOSE}"
    for e in entries:
        for j, ex in enumerate(e.examples):
            lines += ["", f"--- {e.kind} {e.name}, example {j + 1} (supervised text {marks})"]
            lines.append(render(ex, color))
    return "\n".join(lines)
