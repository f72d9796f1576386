"""Tokenizers that need no hub: the instant byte tokenizer and the shared HF wrapping.

:func:`byte_tokenizer` maps each UTF-8 byte to one token (256 ids) plus the special tokens; it
has no merges and needs no training, so tests can build a tiny model in milliseconds. The
trained BPE tokenizer shipped in ``builtin/base/`` (``scripts/build_tokenizer.py``) is wrapped
by the same :func:`wrap`, so both render :data:`mixtune.data.template.DEFAULT_CHAT_TEMPLATE`
identically and agree on EOS and padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from mixtune.data.template import DEFAULT_CHAT_TEMPLATE, EOS_TOKEN, ROLE_TOKENS

PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (PAD_TOKEN, *ROLE_TOKENS, EOS_TOKEN)
MAX_LENGTH = 256  # the built-in base model's context

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def byte_alphabet() -> list[str]:
    """The printable stand-in for each byte 0..255 used by byte-level BPE, in byte order.

    Printable Latin-1 bytes stand for themselves; the rest are shifted above U+0100 so that
    every byte has a visible, whitespace-free symbol (the usual byte-level BPE convention,
    which ``tokenizers``' ByteLevel pre-tokenizer and decoder expect).
    """
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, shifted = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(0x100 + shifted))
            shifted += 1
    return out


def wrap(tok: Tokenizer, max_length: int | None = None) -> PreTrainedTokenizerFast:
    """A ``tokenizers.Tokenizer`` as a transformers tokenizer with mixtune's chat setup."""
    # imported here so that ``import mixtune.builtin`` (data only) stays light
    from transformers import PreTrainedTokenizerFast

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    if max_length is not None:
        hf.model_max_length = max_length
    hf.chat_template = DEFAULT_CHAT_TEMPLATE
    return hf


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A purely byte-level tokenizer: ids 0..255 are bytes, 256.. the special tokens."""
    vocab = {ch: b for b, ch in enumerate(byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return wrap(tok)
