"""RequestStream: one request's outputs for its consumer, and the errors a consumer may get.

A stream holds one output for its consumer: the newest, as a cumulative output holds all
before it, so a slow consumer skips intermediate states instead of growing a queue and never
misses the final state; for a DELTA request (RequestOutputKind), the deltas not yet taken,
merged into one. Closing a stream before it finished (the consumer was cancelled, the client
went away) aborts the request, which frees its KV blocks at the engine's next step boundary.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable, Optional

from aserve.logprobs import FlatLogprobs
from aserve.outputs import CompletionOutput, RequestOutput

if TYPE_CHECKING:
    from aserve.engine.engine_driver import EngineDriver

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step driver failed; no request can be served any more."""


class RequestAbortedError(RuntimeError):
    """The request was aborted before it finished, by someone else than its consumer (the
    server shutting down); `code` names why, for the client's error body."""

    def __init__(self, message: str, code: str = "request_aborted"):
        super().__init__(message)
        self.code = code


class RequestStream:
    """The outputs of one request, for `async for`; holds only the newest (cumulative) one, or
    the deltas not yet taken, merged (delta=True)."""

    def __init__(self, request_id: str, owner: "EngineDriver", delta: bool = False):
        self.request_id = request_id
        self._delta = delta
        self._owner = owner
        self._latest: Optional[RequestOutput] = None
        self._error: Optional[BaseException] = None
        self._ready = asyncio.Event()
        self.finished = False     # the engine reported the final output (or an error)
        self._delivered_last = False
        self._sink: Optional[Callable[[RequestOutput], bool]] = None

    def set_sink(self, sink: Optional[Callable[[RequestOutput], bool]]) -> None:
        """sink(output), on the loop, is offered each output before the consumer is woken; an
        output it takes (returns True) never reaches the consumer. It is not offered outputs
        while the consumer has one to take, so the two never see them out of order."""
        self._sink = sink

    # -- called by the step driver
    def _put(self, output: RequestOutput) -> bool:
        """Hand over an output; returns whether that woke the consumer (the sink did not take it)."""
        if self._sink is not None and not self._ready.is_set():
            try:
                if self._sink(output):
                    return False
            except Exception:  # the consumer gets the output instead, and every later one
                logger.exception("a stream's output sink failed; its consumer takes over")
                self._sink = None
        if self._delta and self._ready.is_set() and self._latest is not None:
            output = merge_deltas(self._latest, output)   # the consumer has not taken the last
        self._latest = output
        if output.finished:
            self.finished = True
        self._ready.set()
        return True

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self.finished = True
        self._ready.set()

    # -- called by the consumer
    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._delivered_last:
            raise StopAsyncIteration
        await self._ready.wait()
        self._ready.clear()
        if self._error is not None:
            self._delivered_last = True
            raise self._error
        output = self._latest
        if output.finished:
            self._delivered_last = True
        return output

    def close(self) -> None:
        """Abort the request unless it already finished; safe to call more than once."""
        if not self.finished:
            self.finished = True  # its consumer is leaving: nobody needs waking
            self._owner.abort(self.request_id)


def merge_deltas(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One DELTA output holding two in a row: each sample's text, token ids and logprobs
    joined; everything else (cumulative logprob, finish, metrics) as the later one says."""
    samples = {out.index: out for out in earlier.outputs}
    for out in later.outputs:
        first = samples.get(out.index)
        if first is not None:
            out = CompletionOutput(out.index, first.text + out.text, first.token_ids + out.token_ids,
                                   out.cumulative_logprob, joined_logprobs(first.logprobs, out.logprobs),
                                   out.finish_reason, out.stop_reason)
        samples[out.index] = out
    return RequestOutput(later.request_id, later.prompt, later.prompt_token_ids,
                         joined_logprobs(earlier.prompt_logprobs, later.prompt_logprobs),
                         sorted(samples.values(), key=lambda out: out.index), later.finished,
                         later.error or earlier.error, later.metrics, later.num_cached_tokens)


def joined_logprobs(first, second):
    """Two runs of logprob positions as one (either may be None)."""
    if first is None or second is None:
        return second if first is None else first
    if isinstance(first, FlatLogprobs) and isinstance(second, FlatLogprobs):
        return first.joined(second)
    return list(first) + list(second)
