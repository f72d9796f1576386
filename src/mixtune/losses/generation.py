"""New targets for CADFT's rewriting: the generator, sampling, re-tokenising and scoring.

:class:`TargetGenerator` writes a new response for each example :mod:`mixtune.losses.rewrite`
selected, on the main process: the model being trained (or another causal LM, ``rewriter.model``,
loaded once) samples a continuation of the example's prompt (:func:`sample`: nucleus sampling,
randomness only from the event's generator), the text is rendered as the final assistant turn
and tokenised like the data pipeline (:func:`retarget`), and the old and new targets are scored
by their mean NLL under the trained model (:func:`mean_nll`, the compatibility c).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mixtune.data.tokenize import resolve_template
from mixtune.errors import DataError
from mixtune.eval.domains import normalize_answer
from mixtune.losses.core import IGNORE, sequence_mean
from mixtune.losses.logits import token_nll
from mixtune.schema import check

if TYPE_CHECKING:
    from mixtune.engine.state import TrainState


@dataclass(frozen=True)
class RewriterConfig:
    model: str | None = None
    """null: the model being trained; or a local path / hub name / ``builtin`` of another causal
    LM that reads the training tokenizer's rendered prompts."""
    top_p: float = 0.9
    temperature: float = 0.7
    max_new_tokens: int | None = None
    """Generation budget; null = train.max_length minus the prompt length."""

    def __post_init__(self):
        check(0 < self.top_p <= 1, "loss.rewriter.top_p", "must be in (0, 1]", self.top_p)
        check(self.temperature > 0, "loss.rewriter.temperature", "must be > 0", self.temperature)
        check(
            self.max_new_tokens is None or self.max_new_tokens >= 1,
            "loss.rewriter.max_new_tokens",
            "must be >= 1 or null",
            self.max_new_tokens,
        )


class TargetGenerator:
    """Writes new targets for chosen examples (``loss.rewriter``); ``verify`` keeps only those
    matching the example's reference answer."""

    def __init__(self, gen: RewriterConfig, verify: bool):
        self.gen, self.verify = gen, verify
        self._external = None  # (model, tokenizer) of rewriter.model, loaded on first use

    def generate(
        self, state: TrainState, chosen, g: torch.Generator, step: int
    ) -> tuple[list[dict], int]:
        """Records of the new targets of ``chosen`` (``[(dataset, index, score), ...]``), with
        their token ids, and the number rejected."""
        tok, max_len = state.tokenizer, state.max_length
        template = resolve_template(tok, state.model_config.chat_template)
        model, gen_tok = self._generator(state)
        policy = state.acc.unwrap_model(state.model)
        out, rejected = [], 0
        for k, e, score in chosen:
            data = state.train_sets[k].data
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
            if self.verify and normalize_answer(text) != normalize_answer(data.answers[e] or ""):
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
                    "dataset": state.train_sets[k].name,
                    "dataset_index": k,
                    "example": e,
                    "score": score,
                    "old_c": mean_nll(state, policy, old_ids, old_labels),
                    "new_c": mean_nll(state, policy, new_ids, new_labels),
                    "prompt": tok.decode(old_ids[:pl], skip_special_tokens=True),
                    "old_text": tok.decode(old_ids[pl:], skip_special_tokens=True),
                    "new_text": text,
                    "input_ids": new_ids,
                    "labels": new_labels,
                }
            )
        return out, rejected

    def _generator(self, state: TrainState):
        if self.gen.model is None:
            return state.acc.unwrap_model(state.model), state.tokenizer
        if self._external is None:
            from dataclasses import replace

            from mixtune.engine import build

            mcfg = replace(
                state.model_config,
                name_or_path=self.gen.model,
                tokenizer=None,
                config=None,
                lora=type(state.model_config.lora)(),
            )
            gtok = build.load_tokenizer(mcfg)
            model = build.load_model(mcfg, gtok, state.seed, build.pick_dtype("auto", frozen=True))
            self._external = (model.to(state.acc.device).eval(), gtok)
        return self._external


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
def mean_nll(state: TrainState, model, ids: np.ndarray, labels: np.ndarray) -> float:
    """Mean response-token NLL (the compatibility c) of one example under ``model``."""
    was_training = model.training
    model.eval()
    device = state.acc.device
    with state.acc.autocast():
        input_ids = torch.as_tensor(ids, device=device)[None]
        nll, mask = token_nll(model, input_ids, None, torch.as_tensor(labels, device=device)[None])
    if was_training:
        model.train()
    return float(sequence_mean(nll, mask)[0])
