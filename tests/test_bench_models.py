"""The synthetic tokenizers of bench/make_random_model.py, which the serving benchmarks detokenize
with: the byte-level one must behave as a real byte-level BPE (OPT's, Llama-3's) does."""

from __future__ import annotations

import os
import sys

import pytest

# Appended, not first: a bench script's name must never hide an installed package of that name.
sys.path.append(os.path.join(os.path.dirname(__file__), "..", "bench"))

from make_random_model import synthetic_tokenizer  # noqa: E402

from aserve.engine.detokenizer import IncrementalDetokenizer  # noqa: E402


def test_byte_level_tokenizer_round_trips_any_text_and_names_every_id():
    tokenizer = synthetic_tokenizer(1000, "bytes")
    assert len(tokenizer) == 1000
    text = "Hello wörld, 日本語 ✓"
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text.encode()) and tokenizer.decode(ids) == text
    assert tokenizer.decode([500, 501, 999]) == " w500 w501 w999"
    assert tokenizer.decode([1, 3 + ord("A"), 2], skip_special_tokens=True) == "A"


@pytest.mark.parametrize("kind", ["bytes", "words"])
def test_streamed_text_is_the_decoded_text(kind):
    """Random ids (stray bytes of multi-byte characters among them) stream to the text they add
    to the prompt's."""
    import random

    tokenizer = synthetic_tokenizer(600, kind)
    rng = random.Random(0)
    for _ in range(20):
        prompt, ids = [500, 501, 3 + ord("x")], [rng.randrange(3, 600) for _ in range(40)]
        detokenizer = IncrementalDetokenizer(tokenizer, prompt)
        streamed = ""
        for token_id in ids:
            detokenizer.append(token_id)
            streamed += detokenizer.take_delta()
        detokenizer.finish()
        streamed += detokenizer.take_delta()
        assert streamed == tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)):]
