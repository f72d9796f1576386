"""Pretrain mixtune's tiny built-in base model (a LlamaForCausalLM) from scratch on CPU.

What it learns, on purpose, is *general* material only: dialogue, trivia, definitions, some
arithmetic and a modest dose of safety refusals (mostly harmful -> refusal, a few benign
look-alikes). ``code`` and ``word_problems`` are left out, and most of ``safety`` too, so that
fine-tuning on them shows real transfer, and fine-tuning on anything can visibly erode the
trivia knowledge and the refusals the base model starts with.

Recipe (kept deliberately plain):

1. Every example is rendered with the tokenizer's chat template and trained on *all* its
   tokens, but prompt and template tokens weigh ``PROMPT_WEIGHT`` (0.25) against 1 for the
   response: the model still learns the language of the prompts, while most of its small
   capacity goes to answers rather than to guessing random operands or questions (an earlier
   run with equal weights: safety accuracy 0.69 vs 0.81, trivia 0.95 vs 0.96, arithmetic
   0.09 vs 0.095).
2. Rows of ``--seq-len`` tokens are packed with whole examples drawn by domain weight (token
   shares in ``MIX``); an example never straddles two rows, rows are right-padded.
3. AdamW (betas 0.9/0.95, weight decay on matrices only), linear warm-up then cosine to 10%,
   gradient clipping at 1.0, fp32, ``torch.set_num_threads(--threads)``.

Afterwards it evaluates every built-in domain's eval split (response-only loss, greedy
exact-match accuracy, refusal rates for safety) and saves the model (safetensors), the
tokenizer and ``pretrain_info.json`` to ``src/mixtune/builtin/base/``.

Run (after ``scripts/build_tokenizer.py``): ``python scripts/pretrain_base.py`` -- about ten
minutes on two idle cores (~9k tokens/s). Other processes competing for the cores slow it down
a lot; ``pretrain_info.json`` records the load average so a slow run can be told apart.
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin: with two threads on two cores, any other busy
# process makes spinning barriers ~10x slower (measured: 740 vs 5,200 tokens/s). Set before
# torch is imported, since the OpenMP runtime reads it once.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mixtune.builtin import DOMAINS, REFUSAL, base_model_path, bench_model_path, load_domain
from mixtune.builtin.replay import REPLAY
from mixtune.eval.domains import normalize_answer

# target share of training tokens per domain
MIX = {"definitions": 0.32, "dialogue": 0.12, "trivia": 0.2, "arithmetic": 0.28, "safety": 0.08}
PROMPT_WEIGHT = 0.25
SAFETY_HARMFUL, SAFETY_BENIGN = 400, 100  # the slice of safety's train split seen here


def pretrain_records(seed: int, bench: bool = False) -> dict[str, list[dict]]:
    """The pre-training examples: every train record (the demo's base), or with ``bench`` only
    the ``train_a`` half of the benchmark mixture's domains (``train_b`` stays fresh for
    ``builtin:replay``)."""
    split = "train_a" if bench else "train"
    real = ("definitions", "dialogue") if bench else ("definitions", "dialogue", "trivia")
    recs = {d: load_domain(d, split, seed=seed) for d in real}
    recs["arithmetic"] = load_domain("arithmetic", split, n=20000, seed=seed)
    safety = load_domain("safety", split, seed=seed)
    recs["safety"] = [r for r in safety if r["harmful"]][:SAFETY_HARMFUL] + [
        r for r in safety if not r["harmful"]
    ][:SAFETY_BENIGN]
    return recs


def example(tok, rec: dict) -> tuple[list[int], int]:
    """(token ids of the rendered exchange, number of leading prompt/template tokens)."""
    prompt, full = chat(tok, rec["prompt"]), chat(tok, rec["prompt"], rec["response"])
    assert full[: len(prompt)] == prompt, "the generation prompt must tokenize as a prefix"
    return full, len(prompt)


def chat(tok, prompt: str, response: str | None = None) -> list[int]:
    """Token ids of one rendered exchange; without a response, the generation prompt."""
    msgs = [{"role": "user", "content": prompt}]
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=response is None)
    return tok(text, add_special_tokens=False)["input_ids"]


class Packer:
    """Packs whole examples into fixed-length rows, drawing the domain by weight."""

    def __init__(
        self,
        data: dict[str, list[tuple[list[int], int]]],
        seq_len: int,
        pad_id: int,
        seed: int,
        mix: dict[str, float] = MIX,
    ):
        self.data, self.seq_len, self.pad_id = data, seq_len, pad_id
        self.names = list(data)
        # token shares -> per-example draw probabilities (divide by the mean example length)
        mean_len = {d: sum(len(x) for x, _ in v) / len(v) for d, v in data.items()}
        self.probs = [mix[d] / mean_len[d] for d in self.names]
        self.rng = random.Random(seed)
        self.order = {d: [] for d in self.names}
        self.pending: tuple[int, tuple[list[int], int]] | None = None

    def _next(self) -> tuple[int, tuple[list[int], int]]:
        if self.pending is not None:
            item, self.pending = self.pending, None
            return item
        k = self.rng.choices(range(len(self.names)), weights=self.probs)[0]
        d = self.names[k]
        if not self.order[d]:  # a fresh shuffled epoch of this domain
            self.order[d] = self.rng.sample(range(len(self.data[d])), len(self.data[d]))
        return k, self.data[d][self.order[d].pop()]

    def batch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, domain ids, is-response) of shape (rows, seq_len); domain -1 = padding."""
        ids = torch.full((rows, self.seq_len), self.pad_id, dtype=torch.long)
        dom = torch.full((rows, self.seq_len), -1, dtype=torch.long)
        resp = torch.zeros((rows, self.seq_len), dtype=torch.bool)
        for r in range(rows):
            pos = 0
            while True:
                k, (ex, n_prompt) = self._next()
                if pos + len(ex) > self.seq_len:
                    self.pending = (k, (ex, n_prompt))  # opens the next row: nothing is lost
                    break
                ids[r, pos : pos + len(ex)] = torch.tensor(ex)
                dom[r, pos : pos + len(ex)] = k
                resp[r, pos + n_prompt : pos + len(ex)] = True
                pos += len(ex)
        return ids, dom, resp


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(tok, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def train(model, packer: Packer, args) -> dict:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    k = len(packer.names)
    sums = torch.zeros(k, 2, dtype=torch.float64)  # per domain: response [nll sum, tokens]
    real_tokens, t0 = 0, time.time()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        ids, dom, resp = packer.batch(args.batch_size)  # (B, T) each
        mask = dom >= 0
        logits = model(input_ids=ids, attention_mask=mask.long()).logits  # (B, T, V)
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
        ).view(ids.shape[0], -1)  # (B, T-1)
        tmask, tresp = mask[:, 1:], resp[:, 1:]  # position t predicts token t + 1
        weight = torch.where(tresp, 1.0, PROMPT_WEIGHT) * tmask
        loss = (nll * weight).sum() / weight.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        real_tokens += int(tmask.sum())
        if step >= int(0.9 * args.steps):  # per-domain response loss over the last 10%
            d = dom[:, 1:][tresp]
            sums[:, 0] += torch.bincount(d, nll.detach()[tresp].double(), minlength=k)
            sums[:, 1] += torch.bincount(d, minlength=k).double()
        if step % args.log_every == 0 or step == args.steps - 1:
            dt = time.time() - t0
            print(
                f"step {step:5d}  loss {loss.item():.3f}  lr {lr_at(step, args):.2e}  "
                f"{real_tokens / dt:,.0f} tok/s  {dt:,.0f}s",
                flush=True,
            )
    seconds = time.time() - t0
    return {
        "steps": args.steps,
        "train_seconds": round(seconds, 1),
        "tokens": real_tokens,
        "padded_tokens": args.steps * args.batch_size * args.seq_len,
        "tokens_per_s": round(real_tokens / seconds),
        "final_train_response_loss": {
            n: round(float(sums[i, 0] / sums[i, 1].clamp(min=1)), 4)
            for i, n in enumerate(packer.names)
        },
    }


@torch.no_grad()
def evaluate(model, tok, name: str, n: int, seed: int, batch: int = 32) -> dict:
    """Response-only loss and greedy exact-match accuracy on ``n`` eval records of ``name``."""
    model.eval()
    recs = load_domain(name, "eval", n=n, seed=seed)
    nll_sum = n_tok = correct = 0
    refused = {True: [0, 0], False: [0, 0]}  # harmful? -> [refused, total]
    for lo in range(0, len(recs), batch):
        chunk = recs[lo : lo + batch]
        prompts = [chat(tok, r["prompt"]) for r in chunk]
        full = [chat(tok, r["prompt"], r["response"])[:256] for r in chunk]
        width = max(map(len, full))
        ids = torch.tensor([f + [tok.pad_token_id] * (width - len(f)) for f in full])
        attn = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f in full])
        labels = ids.masked_fill(attn == 0, -100)
        for i, p in enumerate(prompts):
            labels[i, : len(p)] = -100  # score the response (and its EOS) only
        logits = model(input_ids=ids, attention_mask=attn).logits  # (B, T, V)
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1),
            labels[:, 1:].flatten(),
            ignore_index=-100,
            reduction="sum",
        )
        nll_sum += float(nll)
        n_tok += int((labels[:, 1:] != -100).sum())
        answers = [r["answer"] for r in chunk]
        max_new = min(96, max(len(tok(a)["input_ids"]) for a in answers) + 4)
        for r, text in zip(chunk, generate(model, tok, prompts, max_new)):
            hit = normalize_answer(text) == normalize_answer(r["answer"])
            correct += hit
            if "harmful" in r:
                refused[r["harmful"]][0] += normalize_answer(text) == normalize_answer(REFUSAL)
                refused[r["harmful"]][1] += 1
    out = {
        "n": len(recs),
        "loss": round(nll_sum / max(1, n_tok), 4),
        "accuracy": round(correct / max(1, len(recs)), 4),
    }
    if name == "safety":
        out["refusal_rate_harmful"] = round(refused[True][0] / max(1, refused[True][1]), 4)
        out["refusal_rate_benign"] = round(refused[False][0] / max(1, refused[False][1]), 4)
    return out


def generate(model, tok, prompts: list[list[int]], max_new: int) -> list[str]:
    """Greedy continuations of left-padded prompts, cut at EOS."""
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=ids,
        attention_mask=attn,
        max_new_tokens=max_new,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    texts = []
    for row in out[:, width:].tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        texts.append(tok.decode(row, skip_special_tokens=True))
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--steps", type=int, default=1300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--tokenizer", type=Path, default=base_model_path())
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: the demo's base directory (--bench: builtin/bench)",
    )
    ap.add_argument(
        "--bench",
        action="store_true",
        help="the benchmark base: train_a halves only, REPLAY's mixture, no trivia",
    )
    args = ap.parse_args()
    if args.out is None:
        args.out = bench_model_path() if args.bench else base_model_path()
    args.out.mkdir(parents=True, exist_ok=True)
    mix = REPLAY if args.bench else MIX
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    data = {
        d: [example(tok, r) for r in recs]
        for d, recs in pretrain_records(args.seed, args.bench).items()
    }
    data = {d: [x for x in v if len(x[0]) <= args.seq_len] for d, v in data.items()}
    print({d: len(v) for d, v in data.items()}, flush=True)
    model = build_model(tok, args.seed)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    load_before = os.getloadavg()[0]
    info = train(model, Packer(data, args.seq_len, tok.pad_token_id, args.seed, mix), args)
    info["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    t0 = time.time()
    info["eval"] = {d: evaluate(model, tok, d, args.eval_n, args.seed) for d in DOMAINS}
    info["eval_seconds"] = round(time.time() - t0, 1)
    for d, res in info["eval"].items():
        print(f"eval {d:14s} {res}")
    model.save_pretrained(args.out)
    if args.out.resolve() != args.tokenizer.resolve():  # copied as built, not re-saved
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(args.tokenizer / name, args.out / name)
    info.update(
        seed=args.seed,
        mix=mix,
        prompt_weight=PROMPT_WEIGHT,
        safety_slice=[SAFETY_HARMFUL, SAFETY_BENIGN],
        examples={d: len(v) for d, v in data.items()},
        uniform_loss=math.log(len(tok)),
        args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        command="python " + " ".join(sys.argv),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    (args.out / "pretrain_info.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
