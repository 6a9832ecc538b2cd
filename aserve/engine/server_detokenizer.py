"""The text of plain streams, made in an API server's process instead of the engine process's.

At saturation the engine process is what limits a served run, and turning its tokens into text
is part of its step: the step's "process" part was 1.97 ms served against 0.95 offline without
a tokenizer, of a 6.3 ms step at 512 sequences on an H100 host (bench/RESULTS.md, 2026-12-06).
Every API server over an engine process (one, or several: --api-server-count) decodes its own
streams, as vLLM's front end does: their requests go to the engine with detokenize=False, and
their outputs' token ids are decoded here, by the same IncrementalDetokenizer the engine would
use, into the same text (ProcessAsyncEngine's text_here gives the measurements).

Only requests whose text the engine needs for nothing else come here: one sample (n = 1, no
best_of, no beams), no stop strings (matched in the text, in the engine), outputs that carry
each token once (DELTA in the engine, output_wire.as_delta_in_engine, or FINAL_ONLY), and a
tokenizer on this side. Every other request is decoded in the engine process as before.
"""

from __future__ import annotations

import copy

from aserve.engine.detokenizer import IncrementalDetokenizer, prepare_tokenizer
from aserve.sampling_params import RequestOutputKind, SamplingParams


# Output kinds whose outputs carry each token once: DELTA's new ones, FINAL_ONLY's one output.
_EACH_TOKEN_ONCE = (RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY)


def decodable_here(params, tokenizer) -> bool:
    """Whether the server can make this request's text (module docstring): params as they go
    to the engine, after as_delta_in_engine."""
    return (tokenizer is not None and isinstance(params, SamplingParams) and params.detokenize
            and not params.stop and params.n == 1 and params.best_of == 1 and not params.use_beam_search
            and params.output_kind in _EACH_TOKEN_ONCE)


def without_text(params: SamplingParams, fresh_copy: bool) -> SamplingParams:
    """params for the engine, detokenize off; a copy unless fresh_copy says params is one already."""
    params = params if fresh_copy else copy.copy(params)
    params.detokenize = False
    return params


class ServerDetokenizers:
    """One IncrementalDetokenizer per request decoded here, made with its first output (which
    carries the prompt's ids: the window of tokenizers that decode in context starts there)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # A byte-level tokenizer's byte table, built now (the server makes this while the engine
        # process loads the model) rather than by the first stream's first output: 30 of a
        # 1000-request burst's ~160 busy samples of the server's loop on the development machine.
        prepare_tokenizer(tokenizer)
        self._pending: dict[str, SamplingParams] = {}   # request id -> its params, before its first output
        self._running: dict[str, IncrementalDetokenizer] = {}

    def add(self, request_id: str, params: SamplingParams) -> None:
        self._pending[request_id] = params

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._running or request_id in self._pending

    def forget(self, request_id: str) -> None:
        self._pending.pop(request_id, None)
        self._running.pop(request_id, None)

    def with_text(self, request_id: str, prompt_ids, sample: tuple, finished: bool) -> tuple:
        """An output_wire sample tuple of a request decoded here, with the text of its new
        tokens (at its end also held-back bytes of an incomplete character, as U+FFFD, as in
        the engine)."""
        index, _, token_ids, *rest = sample
        detokenizer = self._running.get(request_id)
        if detokenizer is None:
            params = self._pending.pop(request_id)
            detokenizer = self._running[request_id] = IncrementalDetokenizer(
                self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens)
        detokenizer.extend(token_ids)
        if finished:
            detokenizer.finish()
            del self._running[request_id]
        return (index, detokenizer.take_delta(), token_ids, *rest)
