"""Token bytes of byte-level BPE tokenizers (GPT-2, OPT, Llama-3, Qwen2), for detokenizing a
token at a time without a Rust call.

A byte-level decoder maps each token to a fixed string of bytes (its symbols through GPT-2's
printable remapping of the 256 bytes; a token with any other character, such as an added token
with a space, as its UTF-8) and decodes the joined bytes of all tokens as UTF-8, each invalid
sequence becoming U+FFFD. So a sequence's text is an incremental UTF-8 decoding of its tokens'
bytes: one table lookup and one C call a token, half of what the detokenizer's Rust
`DecodeStream` path costs (0.6 against 1.3 us a token on the development machine).
The table is checked against the tokenizer's own decode when it is built; any difference (a
tokenizers version that decodes otherwise) leaves the tokenizer on the general path.
"""

from __future__ import annotations

import random
import weakref
from typing import Optional

__all__ = ["byte_level_table"]

# Per tokenizer, its tables with and without special tokens (None: not byte-level).
_tables: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# Random id sequences the table is checked on, of this many ids each.
_CHECKS, _CHECK_LENGTH = 32, 24


def _byte_of_symbol() -> dict[str, int]:
    """GPT-2's remapping, reversed: printable bytes stand for themselves, the other 68 bytes
    for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


_BYTE_OF_SYMBOL = _byte_of_symbol()


def _token_bytes(token: str) -> bytes:
    try:
        return bytes(_BYTE_OF_SYMBOL[c] for c in token)
    except KeyError:   # a character outside the remapping: the decoder takes the token's UTF-8
        return token.encode()


def _build(backend, skip_special_tokens: bool) -> Optional[tuple]:
    from tokenizers import decoders

    if not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    size = backend.get_vocab_size(with_added_tokens=True)
    special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    table = []
    for token_id in range(size):
        token = backend.id_to_token(token_id)
        table.append(b"" if token is None or (skip_special_tokens and token_id in special)
                     else _token_bytes(token))
    table = tuple(table)
    rng = random.Random(0)
    samples = [sorted(special)] + [[rng.randrange(size) for _ in range(_CHECK_LENGTH)] for _ in range(_CHECKS)]
    for ids in samples:
        if b"".join(table[i] for i in ids).decode("utf-8", "replace") != backend.decode(ids, skip_special_tokens):
            return None
    return table


def byte_level_table(tokenizer, backend, skip_special_tokens: bool) -> Optional[tuple]:
    """The bytes of each token id of a byte-level tokenizer (b"" for special tokens when they are
    skipped, and for ids it does not know), or None when its decoder is not byte-level. backend:
    its Rust tokenizer. Built once per tokenizer and setting."""
    try:
        per_setting = _tables.setdefault(tokenizer, {})
    except TypeError:   # not weak-referenceable: built each time (tests' stand-ins)
        per_setting = {}
    if skip_special_tokens not in per_setting:
        per_setting[skip_special_tokens] = _build(backend, skip_special_tokens)
    return per_setting[skip_special_tokens]
