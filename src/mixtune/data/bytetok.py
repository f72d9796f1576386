"""The byte-level tokenizer (256 byte tokens + chat special tokens; no download, no training).

Defined in :mod:`mixtune.builtin.tokenizer`; re-exported here for ``model.tokenizer: byte``.
"""

from mixtune.builtin.tokenizer import PAD_TOKEN, byte_tokenizer

__all__ = ["PAD_TOKEN", "byte_tokenizer"]
