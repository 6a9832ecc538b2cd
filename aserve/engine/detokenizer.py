"""Incremental detokenization with stop strings, one `IncrementalDetokenizer` per sequence.

Decoding uses the prefix/read-offset window of vLLM (and of `tokenizers.decoders.DecodeStream`):
the ids since the previous emission (the context) plus the ids not yet emitted are decoded
together, and the new text is what lies past the context's own decoding. Decoding in context keeps
leading spaces right (Metaspace/SentencePiece decoders strip the first space of a string, which
must only happen at the very start) and merges multi-byte characters split over tokens; a piece
ending in U+FFFD is held back until the character completes. The window starts at the prompt's
last few tokens, so the first output token is decoded as it reads after the prompt.

Byte-level BPE tokenizers (GPT-2, OPT, Llama-3, Qwen2) need no window: a token's text does not
depend on its neighbours but through UTF-8, so their tokens' bytes go through an incremental
UTF-8 decoder (byte_level_decoding.py). Other fast tokenizers step a Rust `DecodeStream`
(about 1 us a token); the window is also kept in Python so the same state can flush pending
bytes at the end, be forked, and fall back to plain `decode` calls when the stream rejects a
non-monotonic decoding (vLLM issue 17448) or is not available.

With special tokens shown (skip_special_tokens=False), `spaces_between_special_tokens` sets each
added token apart with spaces, as Hugging Face's slow tokenizers (and vLLM) do; fast tokenizers
ignore that flag, so aserve decodes the runs between added tokens itself and joins them.
`clean_up_tokenization_spaces` is not applied while streaming, as in vLLM.
"""

from __future__ import annotations

import codecs
from typing import Callable, Optional, Sequence

try:
    from tokenizers import Tokenizer as _RustTokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21.1 has no DecodeStream: the Python window path serves
    _RustTokenizer = None
    DecodeStream = None

from aserve.engine.byte_level_decoding import byte_level_table

__all__ = ["IncrementalDetokenizer", "prepare_tokenizer", "rust_backend"]

# Prompt tokens decoded as context for the first output token (vLLM uses 4 to 5).
_PROMPT_CONTEXT_TOKENS = 5
_MAX_CONTEXT_TOKENS = 24
_REPLACEMENT = "\ufffd"
# A character's bytes are at most 4 and every token carries at least one, so an incomplete
# character at the end of the ids spans at most their last 3 tokens.
_MAX_INCOMPLETE_TOKENS = 3
# Text ending in U+FFFD is held back while a later token may complete the character. Past this
# many held-back tokens the bytes before the last 3 can no longer change: they are emitted as
# decode() shows them. Without the bound, a run of stray bytes (a degenerate or random-weight
# model) was held back whole and re-decoded on every token: 13 us a token and growing.
_MAX_PENDING_TOKENS = 6


def rust_backend(tokenizer):
    """The Rust `tokenizers.Tokenizer` behind a fast tokenizer (or the object itself), else None."""
    if _RustTokenizer is None:
        return None
    if isinstance(tokenizer, _RustTokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    return backend if isinstance(backend, _RustTokenizer) else None


def _spaces_around_added_tokens(tokenizer, skip_special_tokens: bool,
                                spaces_between_special_tokens: bool) -> frozenset:
    """The added (special) token ids to set apart with spaces, as Hugging Face's slow decode
    does when special tokens are shown; empty when nothing needs it."""
    if skip_special_tokens or not spaces_between_special_tokens:
        return frozenset()
    return frozenset(getattr(tokenizer, "added_tokens_decoder", {}) or ())


def _spaced_decode(rust_decode, ids: list, added: frozenset) -> str:
    # Runs of ordinary tokens decode together; each added token is a part of its own; the parts
    # are joined with single spaces (transformers' slow `_decode` with spaces_between_special_tokens).
    parts, run = [], []
    for token_id in ids:
        if token_id in added:
            if run:
                parts.append(rust_decode(run, False))
                run = []
            parts.append(rust_decode([token_id], False))
        else:
            run.append(token_id)
    if run:
        parts.append(rust_decode(run, False))
    return " ".join(parts)


def _make_decode(tokenizer, backend, skip_special_tokens: bool,
                 spaces_between_special_tokens: bool) -> Callable[[list], str]:
    if backend is not None:
        rust_decode = backend.decode
        added = _spaces_around_added_tokens(tokenizer, skip_special_tokens, spaces_between_special_tokens)
        if added:
            return lambda ids: _spaced_decode(rust_decode, ids, added)
        return lambda ids: rust_decode(ids, skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                        spaces_between_special_tokens=spaces_between_special_tokens,
                                        clean_up_tokenization_spaces=False)


def prepare_tokenizer(tokenizer) -> None:
    """Build at start-up what the first request would otherwise wait for: a byte-level
    tokenizer's byte table (0.05 s for 50k tokens on the development machine)."""
    backend = rust_backend(tokenizer)
    if backend is not None:
        byte_level_table(tokenizer, backend, skip_special_tokens=True)


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text, token by token, and finds stop strings.

    `append(token_id)` per generated token; `text` is what may be shown now (everything but the
    last `max(len(stop)) - 1` characters while running, which could begin a stop string; nothing
    is held back when `include_stop_str_in_output`, since a matched stop string is shown anyway);
    `finish()` when the sequence ends for any reason. `take_delta()` gives the shown text not yet
    taken, for streaming. Deltas only grow the text: a stop string cut never removes shown text.
    `use_decode_stream=False` forces the plain-decode window path, `use_byte_table=False` keeps a
    byte-level tokenizer off its byte path (same texts; for tests).
    """

    __slots__ = ("_decode", "_backend", "_stream", "_ids", "_read", "_prefix_text", "_full",
                 "_stops", "_holdback", "_include_stop", "_finished", "_taken", "_table", "_utf8")

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], *, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False, use_decode_stream: bool = True,
                 use_byte_table: bool = True):
        stops = tuple(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must contain only non-empty strings, got {list(stops)!r}.")
        self._stops = stops
        self._include_stop = include_stop_str_in_output
        self._holdback = 0 if (include_stop_str_in_output or not stops) else max(map(len, stops)) - 1
        self._backend = backend = rust_backend(tokenizer)
        self._decode = _make_decode(tokenizer, backend, skip_special_tokens, spaces_between_special_tokens)
        self._full = ""
        self._finished = False
        self._taken = 0
        self._stream = None
        # The Rust stream cannot put spaces around special tokens: that mode uses the window path.
        spaced = bool(_spaces_around_added_tokens(tokenizer, skip_special_tokens,
                                                  spaces_between_special_tokens))
        self._table = None
        if use_byte_table and backend is not None and not spaced:
            self._table = byte_level_table(tokenizer, backend, skip_special_tokens)
        if self._table is not None:
            # The output's text is its bytes' alone: a prompt ending in part of a character
            # leaves it incomplete on the window path too (_prompt_context).
            self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
            self._ids, self._read, self._prefix_text = [], 0, ""
            return
        self._utf8 = None

        context, prefix_text = self._prompt_context(list(prompt_token_ids[-2 * _MAX_CONTEXT_TOKENS:]))
        self._ids = context  # window: context ids, then ids not yet emitted (from index _read)
        self._read = len(context)
        self._prefix_text: Optional[str] = prefix_text  # None while the Rust stream owns it
        if use_decode_stream and DecodeStream is not None and backend is not None and not spaced:
            try:
                self._stream = DecodeStream(context, skip_special_tokens=skip_special_tokens)
                self._prefix_text = None
            except TypeError:  # an older DecodeStream takes no ids to seed: use the window path
                pass

    # ---------------------------------------------------------------- decoding

    def _prompt_context(self, prompt: list) -> tuple[list, str]:
        """The prompt's last few tokens, as context for the first output token. The start moves
        left (up to _MAX_CONTEXT_TOKENS) while it splits a character: a byte-fallback group cut
        open decodes to U+FFFD whole. Then tokens ending in an incomplete character are left out
        (the output then decodes as `decode` gives it alone, and the stream can extend it)."""
        decode, end = self._decode, len(prompt)
        start = max(0, end - _PROMPT_CONTEXT_TOKENS)
        text = decode(prompt[start:end]) if end else ""
        while _REPLACEMENT in text and start > 0 and end - start < _MAX_CONTEXT_TOKENS:
            start -= 1
            text = decode(prompt[start:end])
        for _ in range(_MAX_INCOMPLETE_TOKENS):
            if not text.endswith(_REPLACEMENT):
                return prompt[start:end], text
            end -= 1
            text = decode(prompt[start:end])
        return ([], "") if text.endswith(_REPLACEMENT) else (prompt[start:end], text)

    def _leave_stream(self, ids: list) -> Optional[str]:
        # The Rust stream refused a decoding that rewrites text it already gave ("Invalid prefix
        # encountered", vLLM issue 17448), or held back more than _MAX_PENDING_TOKENS: go on
        # with plain decode calls from the same window.
        self._stream = None
        self._prefix_text = self._decode(ids[:self._read])
        return self._next_window_piece(ids)

    def _next_window_piece(self, ids: list) -> Optional[str]:
        text = self._decode(ids)
        prefix_text = self._prefix_text
        if len(text) <= len(prefix_text):
            return None
        if text.endswith(_REPLACEMENT):
            return self._settled_piece(ids, text) if len(ids) - self._read > _MAX_PENDING_TOKENS else None
        self._prefix_text = self._decode(ids[self._read:])
        del ids[:self._read]
        self._read = len(ids)
        return text[len(prefix_text):]

    def _incomplete_tail_start(self, ids: list) -> int:
        """Where the last _MAX_INCOMPLETE_TOKENS ids that carry bytes begin: an id that decodes
        to nothing alone (a skipped special token, one past the vocabulary) carries none."""
        decode, split, carrying = self._decode, len(ids), 0
        while split > self._read and carrying < _MAX_INCOMPLETE_TOKENS:
            split -= 1
            carrying += bool(decode(ids[split:split + 1]))
        return split

    def _settled_piece(self, ids: list, text: str) -> Optional[str]:
        """The text of the held-back ids but the last _MAX_INCOMPLETE_TOKENS that carry bytes,
        which no later token can change, when the split there is clean: the two parts decode to
        `text` joined (no character or leading-space rule straddles it). Else None."""
        split = self._incomplete_tail_start(ids)
        head = self._decode(ids[:split])
        prefix_text = self._prefix_text
        if (len(head) <= len(prefix_text) or not head.startswith(prefix_text)
                or head + self._decode(ids[split:]) != text):
            return None
        self._prefix_text = self._decode(ids[self._read:split])
        del ids[:self._read]
        self._read = split - self._read
        return head[len(prefix_text):]

    # ---------------------------------------------------------------- public API

    def append(self, token_id: int, check_stop: bool = True) -> Optional[str]:
        """Add one generated token. Returns the stop string that matched, else None.

        On a match the text is cut at the stop string (kept up to its end with
        `include_stop_str_in_output`) and the detokenizer is finished. check_stop=False
        (before min_tokens) decodes without looking for stop strings.
        """
        assert not self._finished, "append() after the sequence finished"
        utf8 = self._utf8
        if utf8 is not None:  # a byte-level tokenizer
            table = self._table
            # An id past the tokenizer's vocabulary (models pad theirs) decodes to nothing.
            piece = utf8.decode(table[token_id] if token_id < len(table) else b"")
            if not piece:
                return None
            self._full += piece
            return self._check_stop(len(piece)) if self._stops and check_stop else None
        ids = self._ids
        ids.append(token_id)
        stream = self._stream
        if stream is not None:  # the DecodeStream path, inlined
            try:
                piece = stream.step(self._backend, token_id)
            except Exception:  # noqa: BLE001
                piece = self._leave_stream(ids)
            else:
                if piece is not None:
                    del ids[:self._read]  # the emitted ids become the next context, as in the stream
                    self._read = len(ids)
                elif len(ids) - self._read > _MAX_PENDING_TOKENS:
                    # The stream holds back without bound: the window path settles those ids.
                    piece = self._leave_stream(ids)
                else:
                    return None
        else:
            piece = self._next_window_piece(ids)
        if not piece:
            return None
        self._full += piece
        return self._check_stop(len(piece)) if self._stops and check_stop else None

    def extend(self, token_ids: Sequence[int]) -> None:
        """append(token_id, check_stop=False) of each id in turn. A byte-level tokenizer's ids
        are decoded as one run of bytes, in one C call (an incremental UTF-8 decoding gives the
        same text however its bytes are split): an API server decodes each stream's delivery
        this way, several tokens a delivery at saturation, on its event loop."""
        utf8 = self._utf8
        if utf8 is None:
            for token_id in token_ids:
                self.append(token_id, False)
            return
        assert not self._finished, "extend() after the sequence finished"
        table = self._table
        size = len(table)
        piece = utf8.decode(b"".join([table[i] if i < size else b"" for i in token_ids]))
        if piece:
            self._full += piece

    def _check_stop(self, num_new_chars: int) -> Optional[str]:
        # Only the new text and the len(stop) - 1 characters before it can hold a new match.
        full = self._full
        best_index, best_stop = -1, None
        for stop in self._stops:
            index = full.find(stop, max(0, len(full) - num_new_chars - len(stop) + 1))
            if index != -1 and (best_stop is None or index < best_index):
                best_index, best_stop = index, stop
        if best_stop is not None:
            end = best_index + len(best_stop) if self._include_stop else best_index
            self._full = full[:end]
            self._finished = True
        return best_stop

    def finish(self) -> Optional[str]:
        """The sequence ended (any reason): decode tokens still pending (an incomplete character
        at the very end shows as U+FFFD, as `decode` gives) and release held-back text.
        Returns a stop string found in that last text (and cuts there), else None."""
        if self._finished:
            return None
        stop = None
        ids = self._ids
        if self._utf8 is not None:  # the bytes of an incomplete character show as U+FFFD
            piece = self._utf8.decode(b"", final=True)
            if piece:
                self._full += piece
                stop = self._check_stop(len(piece)) if self._stops else None
        elif len(ids) > self._read:
            prefix_text = self._prefix_text
            if prefix_text is None:
                prefix_text = self._decode(ids[:self._read])
            text = self._decode(ids)
            piece = text[len(prefix_text):] if len(text) > len(prefix_text) else ""
            if piece:
                self._full += piece
                stop = self._check_stop(len(piece)) if self._stops else None
        self._finished = True
        return stop

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def text(self) -> str:
        """The text safe to show now."""
        full = self._full
        if self._finished or not self._holdback:
            return full
        return full[:max(0, len(full) - self._holdback)]

    @property
    def full_text(self) -> str:
        """All text decoded so far, including any held back."""
        return self._full

    def take_delta(self) -> str:
        """The part of `text` not returned by an earlier call (for streaming outputs)."""
        full = self._full
        end = len(full) if (self._finished or not self._holdback) else len(full) - self._holdback
        if end <= self._taken:
            return ""
        delta = full[self._taken:end]
        self._taken = end
        return delta

    def fork(self) -> "IncrementalDetokenizer":
        """An independent copy (for a forked sequence: n > 1, beam search)."""
        new = object.__new__(IncrementalDetokenizer)
        for name in self.__slots__:
            setattr(new, name, getattr(self, name))
        new._ids = list(self._ids)  # the window: a handful of ids
        if self._stream is not None:
            new._stream = self._stream.__copy__()
        if self._utf8 is not None:
            new._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
            new._utf8.setstate(self._utf8.getstate())
        return new
