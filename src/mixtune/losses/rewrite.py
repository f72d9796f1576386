"""Compatibility-guided rewriting of persistently incompatible targets (CADFT, arXiv 2606.11206).

The rule: keep a moving average of each training example's compatibility score; after a
warm-up, every R steps select the persistently worst ``fraction`` of the training data, and
replace each selected target, with probability ``prob``, by the model's own sample for the prompt
(nucleus sampling, top-p 0.9, temperature 0.7). Delay, low frequency, a small fraction and the
coin flip guard against collapsing onto what the model can already say.

Details the paper leaves open (our choices, documented in docs/cadft.md):

1. The score averaged is the batch z-score (``score: z``; or the raw mean NLL), by an EMA with
   decay 0.9 seeded with the first observation. Candidates need >= ``min_visits`` (2)
   observations and, for z, a positive average; ties break by (dataset, index).
2. ``fraction`` is of all training examples, ceil(0.005 * N). A rewritten example's average is
   reset, and it may be selected (and rewritten) again later; the original stays in the log.
3. The paper's 3000-step warm-up and 1000-step interval exceed short SFT runs. ``schedule:
   scaled`` (default) reads them per ``ref_steps`` = 10000 steps: warm-up = ceil(max_steps *
   warmup / ref_steps), interval = max(1, round(max_steps * every / ref_steps)), i.e. 30% of
   the run and then every 10%. ``absolute`` uses the numbers as steps (a warning says when
   rewriting can never fire). Events happen at steps s >= warm-up with (s - warm-up) % interval
   == 0, never at the last step.
4. The new target is the sample decoded to text, re-rendered as the final assistant turn by
   the chat template and tokenised like mixtune.data.tokenize (prompt tokens kept as they are),
   truncated to train.max_length. Examples without a prompt (raw text) are never rewritten.
5. Randomness (coins and sampling) comes from a torch.Generator seeded by (run seed, step); the
   global RNG is untouched, so resume stays exact. Rank 0 generates and broadcasts.

Rewrites are logged to ``<output_dir>/rewrites.jsonl`` (step, dataset, index, old/new
compatibility, old/new text) and kept in the loss state (checkpoint ``loss.pt``) with their
token ids, so a resumed run re-applies them.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import torch

from mixtune.data.collate import collate
from mixtune.data.tokenize import resolve_template
from mixtune.errors import DataError
from mixtune.eval.domains import normalize_answer
from mixtune.losses.core import IGNORE, sequence_mean, token_losses

log = logging.getLogger(__name__)


def schedule(opts, max_steps: int) -> tuple[int, int]:
    """``(warm-up, interval)`` in steps for a run of ``max_steps``."""
    if opts.schedule == "absolute":
        return opts.warmup, opts.every
    warm = math.ceil(max_steps * opts.warmup / opts.ref_steps)
    return warm, max(1, round(max_steps * opts.every / opts.ref_steps))


def step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step, 0xCADF]).generate_state(1)[0])


class Rewriter:
    """Tracks per-example compatibility and rewrites the persistently worst targets."""

    def __init__(self, opts, gen):
        self.opts, self.gen = opts, gen
        self.table: dict[tuple[int, int], list] = {}  # (dataset, index) -> [ema, visits]
        self.records: list[dict] = []  # every rewrite, in order, with the new token ids
        self.events = self.rejected = 0
        self.pending = False  # records restored from a checkpoint, not yet applied
        self._external = None  # (model, tokenizer) of rewriter.model, loaded on first use
        self._warned = False

    # -- tracking -------------------------------------------------------------------------------
    def observe(self, trainer, rows: list[torch.Tensor]) -> None:
        """Update the moving averages with this step's (pos, dataset, index, c, z) rows."""
        local = torch.cat(rows) if rows else torch.zeros(0, 5, dtype=torch.float64)
        local = local.to(trainer.acc.device)
        if trainer.world > 1:  # every rank keeps the same table: gather the whole batch
            local = trainer.acc.gather(local)
        data = local.cpu()  # host sync, once per step
        data = data[torch.argsort(data[:, 0], stable=True)]  # global batch order
        decay, col = self.opts.ema, 4 if self.opts.score == "z" else 3
        for row in data.tolist():
            key = (int(row[1]), int(row[2]))
            entry = self.table.get(key)
            if entry is None:
                self.table[key] = [row[col], 1]
            else:
                entry[0] = decay * entry[0] + (1 - decay) * row[col]
                entry[1] += 1
        warm, _ = schedule(self.opts, trainer.cfg.max_steps)
        if not self._warned and warm >= trainer.cfg.max_steps:
            self._warned = True
            log.warning(
                "cadft: rewrite warm-up (%d steps) >= max_steps (%d): no target will be "
                "rewritten; use loss.rewrite.schedule=scaled or fewer steps",
                warm,
                trainer.cfg.max_steps,
            )

    def due(self, step: int, max_steps: int) -> bool:
        warm, every = schedule(self.opts, max_steps)
        return warm <= step < max_steps and (step - warm) % every == 0

    def select(self, trainer) -> list[tuple[int, int, float]]:
        """The worst ``fraction`` by moving average: ``[(dataset, index, score), ...]``."""
        n_total = sum(t.size for t in trainer.train_sets)
        k_sel = math.ceil(self.opts.fraction * n_total)
        cands = sorted(
            (-ema, k, e)
            for (k, e), (ema, visits) in self.table.items()
            if visits >= self.opts.min_visits
            and (self.opts.score == "raw" or ema > 0)
            and trainer.train_sets[k].data.prompt_len[e] > 0
        )
        return [(k, e, -neg) for neg, k, e in cands[:k_sel]]

    def maybe_rewrite(self, trainer) -> None:
        step = trainer.step
        if not self.due(step, trainer.cfg.max_steps):
            return
        self.events += 1
        g = torch.Generator().manual_seed(step_seed(trainer.cfg.seed, step))
        chosen = self.select(trainer)
        coins = torch.rand(len(chosen), generator=g, dtype=torch.float64).tolist()
        chosen = [c for c, u in zip(chosen, coins) if u < self.opts.prob]
        new, rejected = None, 0
        if trainer.acc.is_main_process:
            new, rejected = self._rewrite(trainer, chosen, g, step) if chosen else ([], 0)
        if trainer.world > 1:
            from accelerate.utils import broadcast_object_list

            new, rejected = broadcast_object_list([(new, rejected)])[0]
        self.rejected += rejected
        for rec in new:
            _apply(trainer, rec)
            self.table.pop((rec["dataset_index"], rec["example"]), None)
            self.records.append(rec)
        if trainer.acc.is_main_process and new:
            with open(trainer.rundir.path / "rewrites.jsonl", "a") as f:
                for rec in new:
                    f.write(json.dumps(_public(rec)) + "\n")
        if chosen:
            log.info(
                "cadft: step %d rewrote %d of %d selected targets", step, len(new), len(chosen)
            )

    # -- generation -----------------------------------------------------------------------------
    def _rewrite(self, trainer, chosen, g: torch.Generator, step: int) -> tuple[list, int]:
        tok, max_len = trainer.tokenizer, trainer.cfg.train.max_length
        template = resolve_template(tok, trainer.cfg.model.chat_template)
        model, gen_tok = self._generator(trainer)
        policy = trainer.acc.unwrap_model(trainer.model)
        out, rejected = [], 0
        for k, e, score in chosen:
            data = trainer.train_sets[k].data
            pl = data.prompt_len[e]
            prompt = data.input_ids[e][:pl]
            if gen_tok is not tok:  # another model: hand it the rendered prompt as text
                prompt = np.asarray(
                    gen_tok(tok.decode(prompt), add_special_tokens=False)["input_ids"], np.int64
                )
            budget = self.gen.max_new_tokens or max_len - pl
            ids = sample(
                model,
                prompt,
                min(budget, max_len - pl),
                self.gen.top_p,
                self.gen.temperature,
                g,
                gen_tok.eos_token_id,
            )
            text = gen_tok.decode(ids, skip_special_tokens=True)
            if self.opts.verify and normalize_answer(text) != normalize_answer(
                data.answers[e] or ""
            ):
                rejected += 1
                continue
            new_ids, new_labels = retarget(
                tok, template, data.input_ids[e][:pl], data.labels[e][:pl], text, max_len
            )
            if not (new_labels[1:] != IGNORE).any():
                rejected += 1
                continue
            old_ids, old_labels = data.input_ids[e], data.labels[e]
            out.append(
                {
                    "step": step,
                    "dataset": trainer.names[k],
                    "dataset_index": k,
                    "example": e,
                    "score": score,
                    "old_c": mean_nll(trainer, policy, old_ids, old_labels),
                    "new_c": mean_nll(trainer, policy, new_ids, new_labels),
                    "prompt": tok.decode(old_ids[:pl], skip_special_tokens=True),
                    "old_text": tok.decode(old_ids[pl:], skip_special_tokens=True),
                    "new_text": text,
                    "input_ids": new_ids,
                    "labels": new_labels,
                }
            )
        return out, rejected

    def _generator(self, trainer):
        if self.gen.model is None:
            return trainer.acc.unwrap_model(trainer.model), trainer.tokenizer
        if self._external is None:
            from dataclasses import replace

            from mixtune.engine import setup

            mcfg = replace(
                trainer.cfg.model,
                name_or_path=self.gen.model,
                tokenizer=None,
                config=None,
                lora=type(trainer.cfg.model.lora)(),
            )
            gtok = setup.load_tokenizer(mcfg)
            model = setup.load_model(mcfg, gtok, trainer.cfg.seed, setup.pick_dtype("auto"))
            self._external = (model.to(trainer.acc.device).eval(), gtok)
        return self._external

    # -- resume ---------------------------------------------------------------------------------
    def restore(self, trainer, batches: list[dict] | None) -> float:
        """Apply rewrites restored from a checkpoint; returns the normaliser fix for this step.

        Called from ``prepare``, the batches of the first resumed step were collated (and the
        loop's token count taken) from the original targets: they are rebuilt in place, and the
        returned factor (old / new global token count) corrects the loss normaliser.
        """
        if not self.pending:
            return 1.0
        self.pending = False
        old = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches or [])
        for rec in self.records:
            _apply(trainer, rec)
        if trainer.acc.is_main_process:  # the log holds exactly the checkpoint's rewrites
            with open(trainer.rundir.path / "rewrites.jsonl", "w") as f:
                for rec in self.records:
                    f.write(json.dumps(_public(rec)) + "\n")
        if not batches:
            return 1.0
        new = 0
        for b in batches:
            d, e = b["domain"].tolist(), b["index"].tolist()
            sets = trainer.train_sets
            fresh = collate(
                [sets[k].data.input_ids[j] for k, j in zip(d, e)],
                [sets[k].data.labels[j] for k, j in zip(d, e)],
                trainer.tokenizer.pad_token_id,
                np.asarray(d),
            )
            for key, value in fresh.items():
                b[key] = value.to(b["labels"].device)
            new += int((b["labels"][:, 1:] != IGNORE).sum())
        counts = torch.tensor([old, new], dtype=torch.float64, device=trainer.acc.device)
        if trainer.world > 1:
            counts = trainer.acc.reduce(counts, reduction="sum")
        return float(counts[0] / counts[1])

    def diagnostics(self) -> dict[str, float]:
        return {
            "rewrites": len(self.records),
            "rewrite_events": self.events,
            "rewrites_rejected": self.rejected,
            "tracked": len(self.table),
        }

    def state_dict(self) -> dict:
        return {
            "table": {f"{k} {e}": v for (k, e), v in self.table.items()},
            "records": self.records,
            "events": self.events,
            "rejected": self.rejected,
        }

    def load_state_dict(self, state: dict) -> None:
        self.table = {
            tuple(int(x) for x in key.split()): list(v) for key, v in state["table"].items()
        }
        self.records = list(state["records"])
        self.events, self.rejected = state["events"], state["rejected"]
        self.pending = bool(self.records)


# ----------------------------------------------------------------------------------------------
def _apply(trainer, rec: dict) -> None:
    trainer.replace_example(rec["dataset_index"], rec["example"], rec["input_ids"], rec["labels"])


def _public(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("input_ids", "labels")}


@torch.no_grad()
def sample(
    model,
    prompt: np.ndarray,
    max_new: int,
    top_p: float,
    temperature: float,
    g: torch.Generator,
    eos_id: int,
) -> list[int]:
    """Nucleus sampling of one continuation with a KV cache; randomness only from ``g``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(prompt), device=device)[None]  # (1, T)
    past, out = None, []
    for _ in range(max_new):
        o = model(input_ids=x, past_key_values=past, use_cache=True)
        past = o.past_key_values
        probs = torch.softmax(o.logits[0, -1].float().cpu() / temperature, -1)  # (V,)
        p_sorted, order = probs.sort(descending=True, stable=True)
        keep = (p_sorted.cumsum(0) - p_sorted) < top_p  # the nucleus; the top token always
        p_sorted = p_sorted * keep
        tok = int(order[torch.multinomial(p_sorted / p_sorted.sum(), 1, generator=g)])
        if tok == eos_id:
            break
        out.append(tok)
        x = torch.tensor([[tok]], device=device)
    if was_training:
        model.train()
    return out


def retarget(
    tok, template: str, prompt_ids: np.ndarray, prompt_labels: np.ndarray, text: str, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt tokens + ``text`` rendered and tokenised as the final assistant turn."""
    msgs = [{"role": "user", "content": "x"}]
    prefix = tok.apply_chat_template(
        msgs, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    full = tok.apply_chat_template(
        msgs + [{"role": "assistant", "content": text}],
        chat_template=template,
        tokenize=False,
        add_generation_prompt=False,
    )
    if not full.startswith(prefix):
        raise DataError(
            "cadft rewriting: the chat template does not render conversations "
            "prefix by prefix; set model.chat_template to one that does"
        )
    seg = tok(full[len(prefix) :], add_special_tokens=False)["input_ids"]
    ids = np.concatenate([prompt_ids, np.asarray(seg, np.int64)])[:max_len]
    labels = np.concatenate([prompt_labels, np.asarray(seg, np.int64)])[:max_len]
    return ids.astype(np.int64), labels.astype(np.int64)


@torch.no_grad()
def mean_nll(trainer, model, ids: np.ndarray, labels: np.ndarray) -> float:
    """Mean response-token NLL (the compatibility c) of one example under ``model``."""
    was_training = model.training
    model.eval()
    device = trainer.acc.device
    with trainer.acc.autocast():
        logits = model(input_ids=torch.as_tensor(ids, device=device)[None]).logits
        nll, mask = token_losses(logits, torch.as_tensor(labels, device=device)[None])
    if was_training:
        model.train()
    return float(sequence_mean(nll, mask)[0])
