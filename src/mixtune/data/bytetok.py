"""A byte-level tokenizer that needs no download and no training.

256 byte tokens plus the chat special tokens of :mod:`mixtune.data.template`; every string
round-trips. Tests and ``model.tokenizer: byte`` use it to build tiny models instantly.
"""

from __future__ import annotations

from mixtune.data.template import DEFAULT_CHAT_TEMPLATE, EOS_TOKEN, ROLE_TOKENS

PAD_TOKEN = "<|pad|>"


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast``: ids 0-255 are bytes, then pad, EOS and the role tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
    )
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok
