"""AsyncEngine: the Engine driven from the server's event loop, its steps in a thread of their own.

The Engine (not thread-safe) is only ever touched by one thread, the engine thread, which runs
whole steps, one after another, for as long as there is work: scheduling, the model forward,
sampling and output processing. The event loop's only work is HTTP: it hands new requests,
aborts and calls to the engine thread, which applies them between steps, in order; and it takes
the engine's outputs when it is ready for them. The engine never waits for the loop: while the
loop parses requests or writes chunks, the engine goes on stepping, and the loop then takes
the newest output of each request (vLLM's engine core and API server work the same way, in
two processes). So /health and the token streams are answered while the engine computes: the
engine thread yields the GIL at least every switch interval (5 ms) and inside torch's kernels;
on a GPU it simply waits on the device.

Both threads hold the GIL for their Python work, so every moment the loop spends writing
chunks is a moment the engine does not step. At a few streams that is nothing; at 256 streams
one round of writes (a chunk each) costs about as much as a step of a small model on a fast
GPU, and writing every step would halve the engine's speed. So when a round of writes takes
longer than a step / DELIVERY_REST, the loop then rests DELIVERY_REST times as long as the
writing took before it takes the next outputs: delivery gets at most 1 / (1 + DELIVERY_REST)
of the time. The rest ends early when the engine thread runs out of steps (the last tokens
of a burst then go out at once, not up to 0.1 s later). A stream then gets its tokens in
chunks of a few when the server is saturated, and one chunk per token when it is not.
Streams themselves are in request_stream.py; a plain stream's chunks are written by its sink
during the dispatch (server/chunk_sink.py), without waking its handler.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Optional, Union

from aserve.engine.engine_ops import Add, Call, apply_op, settle
from aserve.engine.pipeline import run_step_gen
from aserve.engine.request_factory import TokenizedPrompt
from aserve.engine.request_stream import EngineDeadError, RequestAbortedError, RequestStream
from aserve.outputs import RequestOutput
from aserve.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["AsyncEngine", "EngineDeadError", "RequestAbortedError", "RequestStream"]

logger = logging.getLogger("aserve.engine")

# How long shutdown waits for the step in flight of an engine that has died.
_SHUTDOWN_STEP_WAIT_S = 5.0
# A batch of outputs is handed to its streams this many at a time, the loop free in between:
# 256 outputs at once (each waking a handler) would hold /health back for the whole batch.
DISPATCH_BATCH = 16
# Outputs that a stream's sink writes at once (server/chunk_sink.py) cost a few microseconds
# each: the loop is left free after this long of them, not after every DISPATCH_BATCH, since
# every turn of the loop may pass the GIL to the engine thread and wait to get it back.
_DISPATCH_SLICE_S = 0.001
# After writing a batch of outputs, the loop leaves the GIL to the engine thread this many
# times as long as the writing took, when that is longer than a step (module docstring). 0
# takes outputs as fast as the loop can. bench/RESULTS.md has the figures that chose it
# (2026-12-02: 4; 2026-12-03, ninth session: 6, once the chunk sinks made a round of writes
# cheaper than the rest of a hand-over); ASERVE_DELIVERY_REST overrides it (and an engine
# process's, process_async_engine.py), for benchmarks.
DELIVERY_REST_OVERRIDE = os.environ.get("ASERVE_DELIVERY_REST") or None
DELIVERY_REST = float(DELIVERY_REST_OVERRIDE or "6")
# A rest is never longer than this: at thousands of streams, chunks still come this often.
_MAX_REST_S = 0.1
# A rest shorter than this is not worth a timer.
_MIN_REST_S = 0.0005
# How long the engine thread waits before stepping again after a step that did nothing (a
# structured-output request waiting for its grammar).
_IDLE_STEP_WAIT_S = 0.001


class AsyncEngine:
    """Owns an Engine, the thread that steps it and the coroutine that feeds that thread and
    delivers its outputs; the server's only way into the engine."""

    def __init__(self, engine):
        self.engine = engine
        self._streams: dict[str, RequestStream] = {}
        # The engine thread: the only thread that touches the Engine once the driver runs.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aserve-engine")
        # Adds, aborts (request ids) and calls for the engine thread, applied in this order at
        # its step boundaries (a deque: the loop appends while the engine thread takes).
        self._inbox: collections.deque = collections.deque()
        self._taken: list = []      # ops the engine thread applied, not yet handed back
        # Wakes the engine thread when it has nothing to step: an op came, or the loop is
        # ready for outputs.
        self._work = threading.Event()
        # Set by the loop when it is ready for the next outputs; the engine thread hands them
        # over at its next step boundary (or at once, if it is idle) and clears it.
        self._wants_outputs = False
        self._stopping = False
        self._batch_waiter: Optional[asyncio.Future] = None
        # Set (on the loop) when the engine thread ran out of steps with outputs waiting: the
        # driver's rest, there to leave the GIL to a stepping engine, then ends at once.
        self._engine_went_idle: Optional[asyncio.Event] = None
        self._engine_loop_done: Optional[asyncio.Future] = None
        self.delivery_rest = DELIVERY_REST
        self._step_seconds = 0.0    # a recent step's wall time, measured by the engine thread
        self._driver: Optional[asyncio.Task] = None
        self._dead: Optional[BaseException] = None
        self._died: Optional[asyncio.Event] = None
        self._finished_listeners: list[Callable[[RequestOutput], None]] = []
        self.num_steps = 0
        self.num_aborted = 0
        # The engine records vLLM's request and step statistics for /metrics (engine/stats.py).
        enable_stats = getattr(engine, "enable_stats", None)
        self.stats = enable_stats() if enable_stats is not None else None
        self._num_pending_adds = 0  # adds handed over whose result has not come back
        # One output per request per batch handed over, however many steps it spans.
        engine.defer_outputs = True

    @classmethod
    def from_engine_args(cls, args) -> "AsyncEngine":
        from aserve.engine.engine import Engine  # the heavy import, only when building one
        return cls(Engine(args))

    # ----------------------------------------------------------------- life cycle
    def start(self) -> None:
        """Start the engine thread's loop and the driver coroutine on the running loop."""
        if self._driver is not None:
            return
        loop = asyncio.get_running_loop()
        self._died = asyncio.Event()
        self._engine_went_idle = asyncio.Event()
        self._start_engine_side(loop)
        self._driver = loop.create_task(self._run(), name="aserve-step-driver")

    def _start_engine_side(self, loop: asyncio.AbstractEventLoop) -> None:
        """What steps the engine: here its thread (an engine in another process has its own)."""
        self._engine_loop_done = loop.run_in_executor(self._executor, self._engine_loop, loop)
        workers = getattr(self.engine, "workers", None)
        if workers is not None:  # a tensor-parallel rank failed: this engine can do nothing more
            workers.add_failure_listener(lambda exc: loop.call_soon_threadsafe(self._die, exc))

    async def shutdown(self) -> None:
        """Stop stepping, end every open stream, and release the engine thread. The engine is
        left empty (its requests aborted, no step in flight) unless it died."""
        await self._stop_driver()
        loop = asyncio.get_running_loop()
        if self._dead is None:  # after the engine loop's last step (one thread: it queues behind it)
            await loop.run_in_executor(self._executor, self._empty_engine)
        # Wait for a step still in flight without blocking the loop while it ends; a dead
        # engine's step may never end (a collective with a dead rank), so not forever.
        try:
            await asyncio.wait_for(loop.run_in_executor(
                None, lambda: self._executor.shutdown(wait=True, cancel_futures=True)),
                _SHUTDOWN_STEP_WAIT_S if self._dead is not None else None)
        except asyncio.TimeoutError:
            logger.warning("a model step is still running; shutting down without it")
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:   # the worker processes of a tensor-parallel engine
            await loop.run_in_executor(None, shutdown)

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
        try:
            await accepted
        except BaseException:
            if accepted.cancelled():  # its caller left: abort whatever the engine took
                stream.close()
            else:                     # refused: the engine holds nothing of it
                self._streams.pop(request_id, None)
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
        """Run fn() in the engine thread between two steps (where the Engine may be touched)."""
        if not self.is_running:
            return fn()  # no engine thread runs: this thread may touch it
        done = asyncio.get_running_loop().create_future()
        self._post(Call(fn, done))
        return await done

    def add_finished_listener(self, listener: Callable[[RequestOutput], None]) -> None:
        """Call listener(output) with the final output of every request (metrics use it)."""
        self._finished_listeners.append(listener)

    def get_stats(self):
        # Counters and lengths only, read while the engine thread may be stepping: no lock (a
        # scrape never waits for a step), and each value is read whole.
        return self.engine.get_stats()

    async def refresh_stats(self) -> None:
        """Bring get_stats() and `stats` up to date: they are the engine's own here (an engine
        in another process has copies to fetch)."""

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests taken but not yet scheduled: on their way to the engine, or in its queue."""
        # The queue's length alone: every request at the door asks, and a whole get_stats()
        # is a dozen reads more.
        return len(self.engine.scheduler.waiting) + self._num_pending_adds

    # ----------------------------------------------------------------- the engine thread
    def _post(self, op) -> None:
        self._inbox.append(op)
        self._work.set()

    def _stop_engine_loop(self) -> None:
        self._stopping = True
        self._work.set()

    def _engine_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """In the engine thread, until shutdown: apply the ops queued since the last step (in
        order), step while there is work, and hand what came of it (outputs, the ops' results)
        to the loop whenever the loop is ready for it. A failed forward or sampler ends that
        step's requests with the error (Engine.step_gen); every other request carries on. An
        exception here is the engine's own failure: the driver gets it and the engine dies."""
        engine = self.engine
        outputs, results, stepped = [], [], 0
        batch_started = time.perf_counter()
        while not self._stopping:
            while self._inbox:
                op = self._inbox.popleft()
                self._taken.append(op)
                apply_op(self.engine, op, results)
            progressed = False
            if engine.has_unfinished_requests():
                tokens_before = engine.prompt_tokens_total + engine.generation_tokens_total
                outputs += run_step_gen(engine.step_gen())
                stepped += 1
                progressed = tokens_before != engine.prompt_tokens_total + engine.generation_tokens_total
            if self._wants_outputs and (outputs or results or stepped):
                self._wants_outputs = False
                if stepped:
                    self._step_seconds = (time.perf_counter() - batch_started) / stepped
                outputs += engine.take_unreported_outputs()
                taken, self._taken = self._taken, []
                loop.call_soon_threadsafe(self._on_batch, (outputs, results, taken, stepped))
                outputs, results, stepped = [], [], 0
                batch_started = time.perf_counter()
            if progressed:
                continue
            # Nothing to step (or a step that did nothing): sleep until an op comes or the loop
            # wants what is waiting. Cleared first, then checked: a set() in between is kept.
            self._work.clear()
            if self._inbox or self._stopping or (self._wants_outputs and (outputs or results or stepped)):
                continue
            if (outputs or results or stepped) and not engine.has_unfinished_requests():
                # Idle with outputs the loop has not asked for yet: it is resting so as to
                # leave the GIL to the steps, and there are none now (a run's last tokens
                # waited up to the whole rest, 0.1 s, for it).
                loop.call_soon_threadsafe(self._engine_went_idle.set)
            self._work.wait(_IDLE_STEP_WAIT_S if engine.has_unfinished_requests() else None)

    def _empty_engine(self) -> None:
        """In the engine thread: abort every request left and finish a step still in flight."""
        engine = self.engine
        engine.abort_request(list(engine.requests))
        while engine.has_unfinished_requests():
            run_step_gen(engine.step_gen())

    # ----------------------------------------------------------------- the driver, on the loop
    def _on_batch(self, batch) -> None:
        """On the loop: the engine thread handed over a batch, for the driver; with the driver
        gone, the ops' results are settled here (no add may wait forever)."""
        outputs, results, ops, stepped = batch
        self._num_pending_adds -= sum(isinstance(op, Add) for op in ops)
        self.num_steps += stepped
        waiter = self._batch_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result((outputs, results))
        else:
            settle(results)

    async def _next_batch(self):
        """The engine thread's next batch; raises what ended the engine thread's loop."""
        self._engine_went_idle.clear()   # set again only when the engine idles after this
        self._batch_waiter = asyncio.get_running_loop().create_future()
        self._wants_outputs = True
        self._work.set()
        done, _ = await asyncio.wait({self._batch_waiter, self._engine_loop_done},
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._batch_waiter in done:
            return self._batch_waiter.result()
        self._batch_waiter.cancel()
        self._engine_loop_done.result()  # raises the engine thread's failure
        raise EngineDeadError("The engine thread stopped.")

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
        """Leave the GIL to the engine thread for `seconds`, or until it has no step to run."""
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
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(exc)
        pending = self._taken + list(self._inbox)
        self._inbox.clear()
        self._taken = []
        self._num_pending_adds = 0
        for op in pending:
            future = op.accepted if isinstance(op, Add) else getattr(op, "done", None)
            if future is not None and not future.done():
                future.set_exception(exc)
