"""IncrementalDetokenizer: streamed text equals decode(), no split characters, stop strings, forks.

Two offline tokenizers cover both leading-space styles: a GPT-2-like byte-level BPE, and a
Llama-like Metaspace BPE ("▁" for spaces, byte-fallback tokens <0xXX>, first space stripped).
Every behaviour runs on each path: the byte table (byte-level tokenizers only; the Metaspace one
then takes the stream path), the Rust DecodeStream and the plain decode() window.
"""

import functools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from aserve.engine.detokenizer import IncrementalDetokenizer
from aserve.engine.token_text import decode_token_text, token_text_decoder

CORPUS = [
    "Hello world, this is a test. Café au lait, naïve résumé, élève.",
    "日本語のテキストです。東京は日本の首都です。", "Emoji time 🙂🙂 😀 👍🏽 done!",
    "The quick brown fox jumps over the lazy dog. STOP here; end.",
    "def f(x):\n    return x + 1\n\n", "Привет мир, как дела?", "🙂 日本 é",
] * 10
# Characters the Metaspace tokenizer never saw, so they come out as byte-fallback tokens.
UNSEEN = "中€🎉ß¿"
ALPHABET = "abcdeHlo ,.\nSTOP" + "éï日本語🙂😀" + UNSEEN
SPECIALS = dict(bos_token="<s>", eos_token="</s>")


@functools.lru_cache(None)
def byte_level_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


@functools.lru_cache(None)
def metaspace_tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"]))
    # Rebuild the model with the 256 byte tokens as ordinary vocabulary, as Llama's has them.
    trained = json.loads(tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok.model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **SPECIALS)


TOKENIZERS = {"byte_level": byte_level_tokenizer, "metaspace": metaspace_tokenizer}
both_tokenizers = pytest.mark.parametrize("tok_name", sorted(TOKENIZERS))
# The detokenizer's arguments that choose each path.
PATHS = {"bytes": {}, "stream": {"use_byte_table": False},
         "window": {"use_byte_table": False, "use_decode_stream": False}}
all_paths = pytest.mark.parametrize("path", sorted(PATHS))
HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def run(tok, prompt, output, **kw):
    """Stream `output` through a detokenizer; return (deltas, detokenizer).

    Special tokens are not spaced apart unless asked, so texts compare with the fast `decode`.
    """
    kw.setdefault("spaces_between_special_tokens", False)
    detok = IncrementalDetokenizer(tok, prompt, **kw)
    deltas = []
    for token_id in output:
        stop = detok.append(token_id)
        deltas.append(detok.take_delta())
        if stop is not None:
            break
    detok.finish()
    deltas.append(detok.take_delta())
    return deltas, detok


def in_context(tok, prompt, output, skip=True):
    """What vLLM shows: the output's text as it reads after the prompt."""
    return tok.decode(prompt + output, skip_special_tokens=skip)[len(tok.decode(prompt, skip_special_tokens=skip)):]


def test_tokenizers_split_characters_over_tokens():
    for tok in (byte_level_tokenizer(), metaspace_tokenizer()):
        ids = encode(tok, UNSEEN + "日本語🙂")
        assert tok.decode(ids) == UNSEEN + "日本語🙂"
        assert any("\ufffd" in tok.decode([i]) for i in ids)


@all_paths
@given(output=st.lists(st.integers(0, 399), max_size=40), prompt=st.lists(st.integers(0, 399), max_size=8),
       skip=st.booleans())
@HYP
def test_byte_level_random_ids_stream_exactly_to_decode(path, output, prompt, skip):
    # Byte-level text does not depend on the prompt (no leading-space rule): even invalid UTF-8
    # (from random ids) streams exactly to decode(), an incomplete tail flushed by finish().
    tok = byte_level_tokenizer()
    deltas, detok = run(tok, prompt, output, skip_special_tokens=skip, **PATHS[path])
    assert "".join(deltas) == detok.text == tok.decode(output, skip_special_tokens=skip)


def metaspace_units():
    """Token ids that never split a character: ordinary pieces, whole characters as byte tokens,
    special tokens."""
    tok = metaspace_tokenizer()
    pieces = [i for t, i in tok.get_vocab().items() if not t.startswith("<")]
    char_bytes = [[3 + b for b in ch.encode()] for ch in UNSEEN + "é日"]
    return st.one_of(st.sampled_from(pieces).map(lambda i: [i]), st.sampled_from(char_bytes),
                     st.sampled_from([[1], [2]]))


@all_paths
@given(units=st.lists(metaspace_units(), max_size=30), prompt_text=st.text(ALPHABET, max_size=12),
       skip=st.booleans())
@HYP
def test_metaspace_units_stream_to_decode_in_prompt_context(path, units, prompt_text, skip):
    tok = metaspace_tokenizer()
    output = [i for unit in units for i in unit]
    prompt = encode(tok, prompt_text)
    deltas, detok = run(tok, prompt, output, skip_special_tokens=skip, **PATHS[path])
    assert "".join(deltas) == detok.text == in_context(tok, prompt, output, skip)
    assert not any("\ufffd" in d for d in deltas)


@both_tokenizers
@given(output=st.lists(st.integers(0, 520), max_size=40), prompt=st.lists(st.integers(0, 520), max_size=8),
       skip=st.booleans())
@HYP
def test_stream_and_window_paths_agree_on_any_ids(tok_name, output, prompt, skip):
    tok = TOKENIZERS[tok_name]()
    fast, _ = run(tok, prompt, output, skip_special_tokens=skip, **PATHS["stream"])
    slow, _ = run(tok, prompt, output, skip_special_tokens=skip, **PATHS["window"])
    assert fast == slow
    # The byte path shows an invalid byte's U+FFFD at once (the others hold it back a little
    # while): the same text, its deltas split differently.
    table, _ = run(tok, prompt, output, skip_special_tokens=skip, **PATHS["bytes"])
    assert "".join(table) == "".join(slow)


@both_tokenizers
@all_paths
@given(text=st.text(ALPHABET, min_size=1, max_size=40))
@HYP
def test_no_replacement_character_in_any_delta(tok_name, path, text):
    tok = TOKENIZERS[tok_name]()
    ids = encode(tok, text)
    deltas, detok = run(tok, [], ids, **PATHS[path])
    assert not any("\ufffd" in d for d in deltas)
    assert detok.text == tok.decode(ids)  # == text, but Metaspace loses a leading space


@all_paths
def test_metaspace_keeps_the_leading_space_after_a_prompt(path):
    tok = metaspace_tokenizer()
    ids = encode(tok, "Hello world")
    split = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]) == "Hello")
    _, detok = run(tok, ids[:split], ids[split:], **PATHS[path])
    assert detok.text == " world"
    _, alone = run(tok, [], ids[split:], **PATHS[path])
    assert alone.text == tok.decode(ids[split:]) == "world"


@both_tokenizers
@all_paths
@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tok_name, path, skip):
    tok = TOKENIZERS[tok_name]()
    output = encode(tok, "Hi there") + [tok.eos_token_id] + encode(tok, " 日本") + [tok.eos_token_id]
    prompt = [tok.bos_token_id] + encode(tok, "Say:")
    _, detok = run(tok, prompt, output, skip_special_tokens=skip, spaces_between_special_tokens=False,
                   **PATHS[path])
    assert ("</s>" in detok.text) is (not skip)
    assert detok.text == in_context(tok, prompt, output, skip)


@both_tokenizers
def test_spaces_between_special_tokens_sets_shown_special_tokens_apart(tok_name):
    tok = TOKENIZERS[tok_name]()
    eos = tok.eos_token_id
    output = encode(tok, "Hi there") + [eos] + encode(tok, "again") + [eos]
    deltas, detok = run(tok, [], output, skip_special_tokens=False, spaces_between_special_tokens=True)
    plain = tok.decode(encode(tok, "Hi there"))
    assert detok.text == f"{plain} </s> {tok.decode(encode(tok, 'again'))} </s>"
    assert "".join(deltas) == detok.text
    _, skipped = run(tok, [], output, skip_special_tokens=True, spaces_between_special_tokens=True)
    assert "</s>" not in skipped.text and " </s>" not in skipped.text


@both_tokenizers
@all_paths
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_token_boundaries(tok_name, path, include):
    tok = TOKENIZERS[tok_name]()
    text = "Hello world, STOP here; end."
    output = encode(tok, text)
    assert not any("ld, ST" in tok.decode([i]) for i in output)  # the stop spans tokens
    deltas, detok = run(tok, [], output, stop=["xyz", "ld, ST"], include_stop_str_in_output=include,
                        **PATHS[path])
    assert "".join(deltas) == detok.text == ("Hello world, ST" if include else "Hello wor")

def test_stop_string_split_over_tokens_is_found():
    tok = byte_level_tokenizer()
    output = encode(tok, "a") + encode(tok, "bc") + encode(tok, "d") + encode(tok, "ef")
    _, detok = run(tok, [], output, stop=["cde"])
    assert detok.text == "ab"


def test_first_completed_stop_string_wins():
    tok = byte_level_tokenizer()
    _, detok = run(tok, [], encode(tok, "abcd"), stop=["abcd", "c"])
    assert detok.text == "ab"


def test_holdback_is_released_on_finish():
    tok = byte_level_tokenizer()
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    for i in encode(tok, "Hello ST"):
        assert detok.append(i) is None
    assert detok.full_text == "Hello ST" and detok.text == "Hello"
    detok.finish()
    assert detok.text == "Hello ST"


@both_tokenizers
@given(text=st.text(ALPHABET, max_size=30), stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3),
       include=st.booleans())
@HYP
def test_shown_text_only_grows_and_never_shows_a_cut_stop(tok_name, text, stops, include):
    tok = TOKENIZERS[tok_name]()
    ids = encode(tok, text)
    text = tok.decode(ids)  # Metaspace drops a leading space
    detok = IncrementalDetokenizer(tok, [], stop=stops, include_stop_str_in_output=include)
    shown, stop = [], None
    for token_id in ids:
        stop = detok.append(token_id)
        shown.append(detok.text)
        if stop is not None:
            break
    if stop is None:
        detok.finish()
    final = detok.text
    assert all(final.startswith(s) for s in shown)
    body = final[:len(final) - len(stop)] if (include and stop) else final
    assert not any(s in body for s in stops)
    if stop is not None:
        assert final.endswith(stop) if include else text.startswith(final + stop)
    else:
        assert final == text
    if len(stops) == 1:  # one stop string: the text is cut at its first occurrence
        index = text.find(stops[0])
        assert final == (text if index < 0 else text[:index + (len(stops[0]) if include else 0)])


@both_tokenizers
@all_paths
def test_fork_is_independent(tok_name, path):
    tok = TOKENIZERS[tok_name]()
    prompt = encode(tok, "Say:")
    ids = encode(tok, "Hello 中")
    cut = next(k for k in range(len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    head = ids[:cut]  # ends inside a character: its first bytes are pending at the fork
    tails = ids[cut:] + encode(tok, " one 🙂"), ids[cut:] + encode(tok, "€ two")
    parent = IncrementalDetokenizer(tok, prompt, stop=["STOP"], **PATHS[path])
    for i in head:
        parent.append(i)
    child = parent.fork()
    for detok, tail in zip((parent, child), tails):
        for i in tail:
            detok.append(i)
        detok.finish()
    assert parent.text == in_context(tok, prompt, head + tails[0]) == " Hello 中 one 🙂"[tok_name == "byte_level":]
    assert child.text == in_context(tok, prompt, head + tails[1])


def test_finish_flushes_an_incomplete_character_as_decode_does():
    tok = byte_level_tokenizer()
    ids = encode(tok, "ok 中")
    cut = next(k for k in range(len(ids), 0, -1) if tok.decode(ids[:k]).endswith("\ufffd"))
    deltas, detok = run(tok, [], ids[:cut])
    assert "".join(deltas) == detok.text == tok.decode(ids[:cut])


def stray_byte(tok_name: str) -> int:
    """The token of the lone byte 0xBA, a UTF-8 continuation byte that no character can start."""
    if tok_name == "metaspace":
        return 3 + 0xBA
    return byte_level_tokenizer().convert_tokens_to_ids("\u00ba")  # ByteLevel's character for 0xBA


def complete_after(tok_name: str) -> list:
    """Ids of a character split over byte tokens, then plain text."""
    tok = TOKENIZERS[tok_name]()
    if tok_name == "metaspace":
        return [3 + b for b in "€".encode()] + encode(tok, "ok")
    return encode(tok, "€ok")


@both_tokenizers
@all_paths
def test_a_long_run_of_stray_bytes_is_emitted_as_it_goes(tok_name, path):
    """Text ending in U+FFFD is held back only while a later token could complete the
    character: a run of stray bytes streams out (as decode() shows it) with a bounded window,
    not at the end after re-decoding the whole run on every token."""
    tok = TOKENIZERS[tok_name]()
    output = [stray_byte(tok_name)] * 300 + complete_after(tok_name)
    detok = IncrementalDetokenizer(tok, [], spaces_between_special_tokens=False, **PATHS[path])
    deltas, held_back = [], []
    for token_id in output:
        detok.append(token_id)
        deltas.append(detok.take_delta())
        held_back.append(len(detok._ids) - detok._read)
    detok.finish()
    deltas.append(detok.take_delta())
    assert "".join(deltas) == detok.text == tok.decode(output)
    # A few tokens at most (aserve holds back up to 6), however long the run; and shown while
    # the run goes on.
    assert max(held_back) <= 8
    assert len("".join(deltas[:300])) >= 290


@both_tokenizers
@given(runs=st.lists(st.tuples(st.integers(0, 12), st.lists(st.integers(0, 520), max_size=4)), max_size=12),
       prompt=st.lists(st.integers(0, 520), max_size=8), skip=st.booleans())
@HYP
def test_stray_byte_runs_stream_to_decode_on_both_paths(tok_name, runs, prompt, skip):
    """Runs of stray bytes (long enough to be settled early) between random ids: both paths give
    the same deltas, and on the byte-level tokenizer (no prompt-dependent spaces) exactly decode()."""
    tok = TOKENIZERS[tok_name]()
    output = [i for count, ids in runs for i in [stray_byte(tok_name)] * count + ids]
    fast, _ = run(tok, prompt, output, skip_special_tokens=skip, **PATHS["stream"])
    slow, detok = run(tok, prompt, output, skip_special_tokens=skip, **PATHS["window"])
    assert fast == slow
    table, _ = run(tok, prompt, output, skip_special_tokens=skip, **PATHS["bytes"])
    assert "".join(table) == "".join(slow)
    if tok_name == "byte_level":
        assert "".join(slow) == detok.text == tok.decode(output, skip_special_tokens=skip)


def byte_ids(tok_name: str, data: bytes) -> list:
    """One token per byte: the byte-fallback ids, or ByteLevel's character for each byte."""
    if tok_name == "metaspace":
        return [3 + b for b in data]
    return [_BYTE_LEVEL_IDS[b] for b in data]


def _byte_level_chars():
    # GPT-2's byte-to-character table: printable Latin-1 bytes map to themselves, the rest to
    # U+0100 onwards in byte order.
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


_BYTE_LEVEL_IDS = {b: byte_level_tokenizer().convert_tokens_to_ids(c) for b, c in _byte_level_chars().items()}


@both_tokenizers
@all_paths
@pytest.mark.parametrize("empties", [1, 3, 5, 8])
def test_tokens_without_bytes_do_not_close_a_pending_character(tok_name, path, empties):
    """Stray bytes, then the first two bytes of U+30FA, then ids that decode to nothing (past the
    vocabulary), then its last byte: the text is decode()'s. On the byte-level tokenizer the
    character is joined; the settled-text bound counted the empty ids as bytes and gave U+FFFD
    for the open character. (ByteFallback decoders join only adjacent byte tokens.)"""
    tok = TOKENIZERS[tok_name]()
    unknown = len(tok) + 7
    output = byte_ids(tok_name, b"\xa1" * 3 + b"\xe3\x83") + [unknown] * empties + byte_ids(tok_name, b"\xba")
    assert tok.decode(output).endswith("\u30fa") == (tok_name == "byte_level")
    deltas, detok = run(tok, [], output, **PATHS[path])
    assert "".join(deltas) == detok.text == tok.decode(output)


def test_prompt_ending_inside_a_character_is_left_out_of_the_context():
    tok = byte_level_tokenizer()
    ids = encode(tok, "x 中 y")
    cut = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    _, detok = run(tok, ids[:cut], ids[cut:])
    assert detok.text == tok.decode(ids[cut:])


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(byte_level_tokenizer(), [], stop=[""])


@both_tokenizers
def test_decode_token_text_matches_decode_and_is_cached(tok_name):
    tok = TOKENIZERS[tok_name]()
    for token_id in range(0, len(tok), 7):
        assert decode_token_text(tok, token_id) == tok.decode([token_id])
    assert decode_token_text(tok, tok.eos_token_id) == "</s>"
    assert decode_token_text(tok, 42) is decode_token_text(tok, 42)


@both_tokenizers
def test_token_text_decoder_gives_decode_token_text_from_the_same_cache(tok_name):
    tok = TOKENIZERS[tok_name]()
    decode = token_text_decoder(tok)
    for token_id in range(0, len(tok), 5):
        assert decode(token_id) == decode_token_text(tok, token_id)
    assert decode(len(tok) - 2) is decode_token_text(tok, len(tok) - 2)


def test_byte_level_tokenizers_take_the_byte_path():
    assert IncrementalDetokenizer(byte_level_tokenizer(), [5])._table is not None
    assert IncrementalDetokenizer(metaspace_tokenizer(), [5])._table is None
    # Special tokens spaced apart are joined by the window path's own decode.
    assert IncrementalDetokenizer(byte_level_tokenizer(), [5], skip_special_tokens=False)._table is None


@given(output=st.lists(st.integers(0, 409), max_size=40), skip=st.booleans())
@HYP
def test_byte_path_decodes_added_tokens_and_unknown_ids_as_decode(output, skip):
    """Added tokens go through the byte-level decoder too (a character outside its alphabet, such
    as a space, makes a token decode as its UTF-8); special ones are skipped when asked; ids the
    tokenizer does not know decode to nothing."""
    tok = tokenizer_with_added_tokens()
    deltas, detok = run(tok, [], output, skip_special_tokens=skip, spaces_between_special_tokens=False)
    assert detok._table is not None
    assert "".join(deltas) == detok.text == tok.decode(output, skip_special_tokens=skip)


@functools.lru_cache(None)
def tokenizer_with_added_tokens():
    """The byte-level tokenizer (ids 0-399) plus added tokens 400-404; ids 405-409 are unknown."""
    from tokenizers import AddedToken

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(
        byte_level_tokenizer().backend_tokenizer.to_str()), **SPECIALS)
    tok.backend_tokenizer.add_tokens([AddedToken("<tool call>", special=False), AddedToken("é¬x", special=False),
                                      AddedToken("plain", special=False)])
    tok.backend_tokenizer.add_special_tokens([AddedToken("<| e o t |>", special=True), AddedToken("<|x|>", special=True)])
    assert len(tok) == 405
    return tok


def test_byte_table_that_disagrees_with_decode_is_not_used(monkeypatch):
    """The table is checked against the tokenizer's decode when built: a tokenizers version that
    decoded otherwise would leave the detokenizer on the DecodeStream path."""
    from aserve.engine import byte_level_decoding

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(
        byte_level_tokenizer().backend_tokenizer.to_str()), **SPECIALS)
    monkeypatch.setattr(byte_level_decoding, "_token_bytes", lambda token: token.encode())
    detok = IncrementalDetokenizer(tok, [5])
    assert detok._table is None and detok._stream is not None


@both_tokenizers
@all_paths
@given(output=st.lists(st.integers(0, 420), max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       prompt=st.lists(st.integers(0, 399), max_size=8))
@HYP
def test_extend_by_runs_of_ids_gives_the_deltas_of_appending_them_one_by_one(tok_name, path, output, cuts,
                                                                                 prompt):
    # An API server decodes each delivery's ids with extend (the byte table: one UTF-8 decoding
    # of their joined bytes); random ids split characters anywhere, and ids past the vocabulary
    # decode to nothing.
    tok = TOKENIZERS[tok_name]()
    if tok_name == "metaspace":
        output = [i % 400 for i in output]   # its vocabulary holds the 256 byte tokens and more
    kw = dict(PATHS[path], spaces_between_special_tokens=False)
    one_by_one, by_runs = IncrementalDetokenizer(tok, prompt, **kw), IncrementalDetokenizer(tok, prompt, **kw)
    bounds = sorted({0, len(output), *(c for c in cuts if c < len(output))})
    for start, end in zip(bounds, bounds[1:]):
        for token_id in output[start:end]:
            one_by_one.append(token_id, False)
        by_runs.extend(output[start:end])
        assert by_runs.take_delta() == one_by_one.take_delta()
    one_by_one.finish()
    by_runs.finish()
    assert by_runs.take_delta() == one_by_one.take_delta()
    assert by_runs.text == one_by_one.text
