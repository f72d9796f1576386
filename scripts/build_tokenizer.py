"""Train the built-in byte-level BPE tokenizer and save it in Hugging Face format.

The tokenizer is trained on the train split of every built-in domain (prompts and responses)
and saved to ``src/mixtune/builtin/base/`` as ``tokenizer.json`` + ``tokenizer_config.json``,
whose ``chat_template`` is :data:`mixtune.data.template.DEFAULT_CHAT_TEMPLATE` (EOS
``<|end|>``, padding ``<|pad|>``). Digits are split one per token before BPE so that numbers are
spelled out digit by digit: the tiny model can then learn column arithmetic instead of having
to memorise a token for every number.

Run: ``python scripts/build_tokenizer.py [--vocab-size 4096]`` (a few seconds). Retraining
changes token ids, so run ``scripts/pretrain_base.py`` afterwards. When only the chat template
changed, ``--template-only`` rewrites it in the saved config and keeps the vocabulary (and so
the pretrained weights) valid.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mixtune.builtin import DOMAINS, base_model_path, load_domain
from mixtune.builtin.tokenizer import MAX_LENGTH, SPECIAL_TOKENS, byte_alphabet, wrap
from mixtune.data.template import DEFAULT_CHAT_TEMPLATE


def corpus(seed: int) -> list[str]:
    """Every train prompt and response, the texts the model will see between template tags."""
    texts = []
    for name in DOMAINS:
        for rec in load_domain(name, "train", seed=seed):
            texts += [rec["prompt"], rec["response"]]
    return texts


def train(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=byte_alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def finish_config(out: Path) -> None:
    """Pin the current chat template, and name the generic fast class so any release loads it."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = DEFAULT_CHAT_TEMPLATE
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def check(out: Path) -> None:
    """Reload with AutoTokenizer and make sure the chat template renders as specified."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|user|>\nWhat is 2 + 3?\n<|assistant|>\n5<|end|>\n", text
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and ids[-2] == tok.eos_token_id, ids
    print(f"vocab {len(tok)}; {text!r} -> {len(ids)} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=base_model_path())
    ap.add_argument(
        "--template-only",
        action="store_true",
        help="only rewrite chat_template in the saved tokenizer_config.json",
    )
    args = ap.parse_args()
    if args.template_only:
        finish_config(args.out)
        check(args.out)
        return
    texts = corpus(args.seed)
    hf = wrap(train(texts, args.vocab_size), max_length=MAX_LENGTH)
    args.out.mkdir(parents=True, exist_ok=True)
    # chat_template inside tokenizer_config.json (not chat_template.jinja) loads on older
    # transformers releases too
    hf.save_pretrained(args.out, save_jinja_files=False)
    finish_config(args.out)
    n_chars = sum(map(len, texts))
    n_tokens = sum(len(e.ids) for e in hf.backend_tokenizer.encode_batch(texts))
    print(f"trained on {len(texts)} texts, {n_chars / n_tokens:.2f} chars/token")
    check(args.out)


if __name__ == "__main__":
    main()
