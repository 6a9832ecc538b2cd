"""The text of one token decoded alone, as vLLM's `Logprob.decoded_token` shows it for every
logprob candidate: cached per tokenizer (and freed with it)."""

from __future__ import annotations

import functools
import weakref
from typing import Callable

from aserve.engine.detokenizer import rust_backend

__all__ = ["decode_token_text", "token_text_decoder"]

# Per-tokenizer caches of single-token texts, freed with their tokenizer.
_token_text_caches: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _token_text_cache(tokenizer) -> dict:
    try:
        return _token_text_caches[tokenizer]
    except KeyError:
        cache = _token_text_caches[tokenizer] = {}
        return cache


def decode_token_text(tokenizer, token_id: int) -> str:
    """The text of one token decoded alone (special tokens kept), as vLLM's
    `Logprob.decoded_token`; a lone byte of a multi-byte character gives U+FFFD. Cached."""
    try:
        cache = _token_text_cache(tokenizer)
    except TypeError:  # not weak-referenceable or unhashable: decode uncached
        cache = {}
    text = cache.get(token_id)
    if text is None:
        backend = rust_backend(tokenizer)
        if backend is not None:
            text = backend.decode([token_id], skip_special_tokens=False)
        else:
            text = tokenizer.decode([token_id], skip_special_tokens=False)
        cache[token_id] = text
    return text


def token_text_decoder(tokenizer) -> Callable[[int], str]:
    """decode_token_text bound to one tokenizer, its cache looked up once: it runs for every
    logprob candidate (1,500 a step at 256 rows with 5 logprobs), where finding the cache in
    the weak dictionary cost more than the text lookup itself."""
    try:
        cache = _token_text_cache(tokenizer)
    except TypeError:  # not weak-referenceable or unhashable: decode uncached
        return functools.partial(decode_token_text, tokenizer)
    get = cache.get

    def decode(token_id: int) -> str:
        text = get(token_id)
        return text if text is not None else decode_token_text(tokenizer, token_id)

    return decode
