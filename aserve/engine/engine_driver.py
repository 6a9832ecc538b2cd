"""EngineDriver: what the server holds of an engine, whatever steps it (a thread of the
server's own process, async_engine.py; a process of its own, process_async_engine.py).

It keeps every request's stream (request_stream.py), hands adds, aborts and calls to the engine
in order, and runs the driver: a coroutine on the server's event loop that takes the engine's
outputs whenever it is ready for them, a batch at a time (each request's newest output, however
many steps it spans: the engine never waits for the loop), and delivers them. A plain stream's
chunks are written by its sink during the dispatch (server/chunk_sink.py), without waking its
handler. When the writing of a batch takes longer than a step / delivery_rest, the driver then
rests delivery_rest times as long before it asks for the next batch, so that at saturation
each batch spans several steps: a stream gets its tokens a few at a time, and the engine's work
of handing outputs over shrinks (each subclass says why its rest is as long as it is). The rest
ends early when the engine runs out of steps (a burst's last tokens then go out at once).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, AsyncIterator, Callable, Optional, Union

from aserve.engine.engine_ops import Add, Call, settle
from aserve.engine.request_factory import TokenizedPrompt
from aserve.engine.request_stream import EngineDeadError, RequestAbortedError, RequestStream
from aserve.outputs import RequestOutput
from aserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("aserve.engine")

# A batch of outputs is handed to its streams this many at a time, the loop free in between:
# 256 outputs at once (each waking a handler) would hold /health back for the whole batch.
DISPATCH_BATCH = 16
# Outputs that a stream's sink writes at once (server/chunk_sink.py) cost a few microseconds
# each: the loop is left free after this long of them, not after every DISPATCH_BATCH, since
# every turn of the loop may pass the GIL to the engine thread and wait to get it back.
_DISPATCH_SLICE_S = 0.001
# ASERVE_DELIVERY_REST overrides every driver's rest (each engine's own default is in its
# module), for benchmarks.
DELIVERY_REST_OVERRIDE = os.environ.get("ASERVE_DELIVERY_REST") or None
# A rest is never longer than this: at thousands of streams, chunks still come this often.
_MAX_REST_S = 0.1
# A rest shorter than this is not worth a timer.
_MIN_REST_S = 0.0005


class EngineDriver:
    """The server's only way into an engine: streams, ops and the driver coroutine. A subclass
    says how ops reach its engine (_post, _stop_engine_loop), how batches come back
    (_next_batch), what starts and stops its side (_start_engine_side, shutdown)."""

    def __init__(self, engine, delivery_rest: float):
        self.engine = engine
        self._streams: dict[str, RequestStream] = {}
        self._stopping = False
        self._batch_waiter: Optional[asyncio.Future] = None
        # Set (on the loop) when the engine ran out of steps with outputs waiting: the
        # driver's rest then ends at once.
        self._engine_went_idle: Optional[asyncio.Event] = None
        self.delivery_rest = float(DELIVERY_REST_OVERRIDE) if DELIVERY_REST_OVERRIDE else delivery_rest
        self._step_seconds = 0.0    # a recent step's wall time, where the engine measures it
        self._driver: Optional[asyncio.Task] = None
        self._dead: Optional[BaseException] = None
        self._died: Optional[asyncio.Event] = None
        self._finished_listeners: list[Callable[[RequestOutput], None]] = []
        self.num_steps = 0
        self.num_aborted = 0
        self.stats = None           # the request and step statistics for /metrics (engine/stats.py)
        self._num_pending_adds = 0  # adds handed over whose result has not come back
        # One output per request per batch handed over, however many steps it spans.
        engine.defer_outputs = True

    # ----------------------------------------------------------------- life cycle
    def start(self) -> None:
        """Start the engine's side and the driver coroutine on the running loop."""
        if self._driver is not None:
            return
        loop = asyncio.get_running_loop()
        self._died = asyncio.Event()
        self._engine_went_idle = asyncio.Event()
        self._start_engine_side(loop)
        self._driver = loop.create_task(self._run(), name="aserve-step-driver")

    def _start_engine_side(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start what steps the engine, or carries ops and batches to and from it."""
        raise NotImplementedError

    async def shutdown(self) -> None:
        """Stop stepping (_stop_driver first), end every open stream, release the engine's side."""
        raise NotImplementedError

    async def _stop_driver(self) -> None:
        """Shutdown's first part, whatever runs the engine: no more steps asked for, the driver
        gone, every open stream ended."""
        self._stop_engine_loop()
        if self._driver is not None:
            self._driver.cancel()
            try:
                await self._driver
            except (asyncio.CancelledError, Exception):
                pass
            self._driver = None
        self._fail_all(EngineDeadError("The server is shutting down."))

    async def wait_until_dead(self) -> BaseException:
        """Returns (with the cause) once the engine has failed for good."""
        await self._died.wait()
        return self._dead

    @property
    def is_running(self) -> bool:
        return self._driver is not None and self._dead is None and not self._driver.done()

    @property
    def dead_error(self) -> Optional[BaseException]:
        return self._dead

    # ----------------------------------------------------------------- requests
    async def add_request(self, request_id: str, prompt: Union[str, list[int], TokenizedPrompt],
                          params: SamplingParams, arrival_time: Optional[float] = None) -> RequestStream:
        """Hand a request to the engine; returns its stream once the engine has taken it (at its
        next step boundary). The engine's ValueError (a bad request) is raised here."""
        return await self.once_accepted(*self.submit(request_id, prompt, params, arrival_time))

    def submit(self, request_id: str, prompt: Union[str, list[int], TokenizedPrompt],
               params: SamplingParams, arrival_time: Optional[float] = None
               ) -> tuple[RequestStream, asyncio.Future]:
        """Hand a request to the engine now, in the caller's turn of the loop: its stream, and
        the future the engine's acceptance settles (for once_accepted). Several prompts of one
        request are submitted together, then awaited: a task per add (asyncio.gather's) would
        reach the engine only in a later turn, behind a burst's other handlers."""
        if not self.is_running:
            raise EngineDeadError(f"The engine is not running: {self._dead or 'not started'}.")
        if request_id in self._streams:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        delta = getattr(params, "output_kind", None) == RequestOutputKind.DELTA   # (PoolingParams: none)
        stream = RequestStream(request_id, self, delta=delta)
        self._streams[request_id] = stream
        accepted = asyncio.get_running_loop().create_future()
        self._post(Add(request_id, prompt, params,
                        time.monotonic() if arrival_time is None else arrival_time, accepted))
        self._num_pending_adds += 1
        return stream, accepted

    async def once_accepted(self, stream: RequestStream, accepted: asyncio.Future) -> RequestStream:
        """The stream of a submitted request once the engine has taken it; the engine's
        ValueError (a bad request) is raised here, and a caller that leaves aborts it."""
        try:
            await accepted
        except BaseException:
            if accepted.cancelled():  # its caller left: abort whatever the engine took
                stream.close()
            else:                     # refused: the engine holds nothing of it
                self._streams.pop(stream.request_id, None)
            raise
        return stream

    async def generate(self, request_id: str, prompt: Union[str, list[int]],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Convenience: an async generator of the request's outputs; aborts when left early."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def abort(self, request_id: str, error: Optional[RequestAbortedError] = None) -> None:
        """Abort a request (its blocks are freed at the engine's next step boundary); unknown or
        finished ids are ignored. A consumer still reading gets `error` (by default a
        RequestAbortedError)."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        if not stream.finished:  # aborted by someone else than its consumer: wake the consumer
            stream._fail(error or RequestAbortedError(f"Request {request_id} was aborted."))
        self.num_aborted += 1
        self._post(request_id)

    def abort_all(self, error: RequestAbortedError) -> int:
        """Abort every open request, each consumer getting `error`; returns how many."""
        request_ids = list(self._streams)
        for request_id in request_ids:
            self.abort(request_id, error)
        return len(request_ids)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn between two of the engine's steps (where the Engine may be touched)."""
        done = asyncio.get_running_loop().create_future()
        self._post(Call(fn, done))
        return await done

    def add_finished_listener(self, listener: Callable[[RequestOutput], None]) -> None:
        """Call listener(output) with the final output of every request (metrics use it)."""
        self._finished_listeners.append(listener)

    def get_stats(self):
        # Counters and lengths only, read while the engine may be stepping: no lock (a scrape
        # never waits for a step), and each value is read whole.
        return self.engine.get_stats()

    async def refresh_stats(self) -> None:
        """Bring get_stats() and `stats` up to date: an engine in this process keeps them
        current itself (an engine in another process has copies to fetch)."""

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests taken but not yet scheduled: on their way to the engine, or in its queue."""
        raise NotImplementedError

    # ----------------------------------------------------------------- the engine's side
    def _post(self, op) -> None:
        """Hand an op (an Add, an abort as its request id, a Call) to the engine, in order."""
        raise NotImplementedError

    def _stop_engine_loop(self) -> None:
        """Ask the engine's side to stop stepping (shutdown, or the engine's death)."""
        raise NotImplementedError

    async def _next_batch(self):
        """The engine's next (outputs, ops' results); raises what ended the engine."""
        raise NotImplementedError

    # ----------------------------------------------------------------- the driver, on the loop
    async def _run(self) -> None:
        try:
            while True:
                outputs, results = await self._next_batch()
                # The engine thread goes on stepping meanwhile; outputs are snapshots, safe to
                # read while it does.
                started = time.perf_counter()
                # A burst of accepted requests resumes its handlers (each sends its headers) a
                # group at a time, like the outputs: /health gets its turn in between.
                try:
                    for first in range(0, len(results), DISPATCH_BATCH):
                        if first:
                            await asyncio.sleep(0)
                        settle(results[first:first + DISPATCH_BATCH])
                finally:  # cancelled in between (shutdown): no add may wait forever
                    settle(results)
                await self._dispatch(outputs)
                await asyncio.sleep(0)  # the streams woken last write their chunks
                # Taking outputs every step costs the engine little while the writing is short
                # next to a step; past that, the loop rests and the engine's batches grow.
                rest = (time.perf_counter() - started) * self.delivery_rest
                if rest > self._step_seconds and rest >= _MIN_REST_S:
                    await self._rest(min(rest, _MAX_REST_S))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the engine itself failed: no step can be trusted now
            if self._stopping and isinstance(exc, EngineDeadError):
                return   # a shutdown: the engine thread's loop ended as it was asked to
            logger.exception("The engine's step driver failed; the server can serve no more requests")
            self._die(exc)

    async def _rest(self, seconds: float) -> None:
        """Rest `seconds`, or until the engine has no step to run."""
        if self._engine_went_idle.is_set():
            return
        # asyncio.wait, not wait_for: Python 3.11's wait_for returns normally when it is
        # cancelled just as the event is set, and a shutdown's cancel was then lost.
        idle = asyncio.ensure_future(self._engine_went_idle.wait())
        try:
            await asyncio.wait({idle}, timeout=seconds)
        finally:
            idle.cancel()

    def _die(self, exc: BaseException) -> None:
        """The engine failed for good: every open request ends with the error, /health turns
        503, and wait_until_dead() returns (the server then exits)."""
        self._stop_engine_loop()
        if self._dead is None:
            self._dead = exc
            self._fail_all(EngineDeadError(f"The engine failed: {exc}"))
            if self._driver is not None and not self._driver.done() \
                    and self._driver is not asyncio.current_task():
                self._driver.cancel()   # it may be waiting on a step that will never end
        self._died.set()

    async def _dispatch(self, outputs: list[RequestOutput]) -> None:
        woken, slice_started = 0, time.perf_counter()
        for output in outputs:
            if woken == DISPATCH_BATCH or time.perf_counter() - slice_started > _DISPATCH_SLICE_S:
                await asyncio.sleep(0)
                woken, slice_started = 0, time.perf_counter()
            if output.finished:
                stream = self._streams.pop(output.request_id, None)
                if stream is None:  # aborted while its last step ran: counted as aborted
                    continue
                for listener in self._finished_listeners:
                    try:
                        listener(output)
                    except Exception:
                        logger.exception("a finished-request listener failed")
            else:
                stream = self._streams.get(output.request_id)
            if stream is not None and stream._put(output):
                woken += 1

    def _fail_all(self, exc: BaseException) -> None:
        """End every stream with exc (a subclass also fails the ops still on their way)."""
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(exc)
        self._num_pending_adds = 0
