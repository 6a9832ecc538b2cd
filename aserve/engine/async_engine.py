"""AsyncEngine: the Engine driven from the server's event loop, its steps in a thread of their own.

The Engine (not thread-safe) is only ever touched by one worker thread, the engine thread,
which runs whole steps there: scheduling, the model forward, sampling and output processing.
The event loop's only work is HTTP: it hands new requests and aborts to the engine thread,
which applies them between steps, in order, and hands each step's outputs back. So the loop
never holds a step's Python work (~20 ms for 300 requests on a CPU core) and answers /health
and the token streams while the engine computes: the engine thread yields the GIL at least
every switch interval (5 ms) and inside torch's kernels; on a GPU it simply waits on the device.

Each request gets a RequestStream: an async iterator of its cumulative RequestOutputs.
Outputs are cumulative, so the stream keeps only the newest one: a slow consumer skips
intermediate states instead of growing a queue, and never misses the final state.
Closing a stream before it finished (the consumer was cancelled, the client went away)
aborts the request, which frees its KV blocks at the engine's next step boundary.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional, Union

from aserve.engine.pipeline import run_step_gen
from aserve.engine.request_factory import TokenizedPrompt
from aserve.outputs import RequestOutput
from aserve.sampling_params import SamplingParams

logger = logging.getLogger("aserve.engine")

# How long shutdown waits for the step in flight of an engine that has died.
_SHUTDOWN_STEP_WAIT_S = 5.0
# A step's outputs are handed to their streams this many at a time, the loop free in between:
# 256 outputs at once (each waking a handler) would hold /health back for the whole batch.
DISPATCH_BATCH = 16


class EngineDeadError(RuntimeError):
    """The step driver failed; no request can be served any more."""


class RequestAbortedError(RuntimeError):
    """The request was aborted before it finished, by someone else than its consumer (the
    server shutting down); `code` names why, for the client's error body."""

    def __init__(self, message: str, code: str = "request_aborted"):
        super().__init__(message)
        self.code = code


@dataclass
class _Add:
    """A request for the engine thread to add; `accepted` gets its result (None or the error)."""

    request_id: str
    prompt: Any
    params: SamplingParams
    arrival_time: float
    accepted: asyncio.Future


@dataclass
class _Call:
    """A function for the engine thread to run between steps (e.g. resetting the prefix cache)."""

    fn: Callable[[], Any]
    done: asyncio.Future


class RequestStream:
    """The outputs of one request, for `async for`; holds only the newest (cumulative) one."""

    def __init__(self, request_id: str, owner: "AsyncEngine"):
        self.request_id = request_id
        self._owner = owner
        self._latest: Optional[RequestOutput] = None
        self._error: Optional[BaseException] = None
        self._ready = asyncio.Event()
        self.finished = False     # the engine reported the final output (or an error)
        self._delivered_last = False

    # -- called by the step driver
    def _put(self, output: RequestOutput) -> None:
        self._latest = output
        if output.finished:
            self.finished = True
        self._ready.set()

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


class AsyncEngine:
    """Owns an Engine, the thread that steps it and the coroutine that drives that thread; the
    server's only way into the engine."""

    def __init__(self, engine):
        self.engine = engine
        self._streams: dict[str, RequestStream] = {}
        # The engine thread: the only thread that touches the Engine once the driver runs.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aserve-engine")
        # Adds, aborts (request ids) and calls for the engine thread, applied in this order.
        self._inbox: list = []
        self._in_flight: list = []  # the inbox being applied now (its futures end with the turn)
        self._engine_busy = False   # the engine had unfinished requests after its last turn
        self._wakeup: Optional[asyncio.Event] = None
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

    @classmethod
    def from_engine_args(cls, args) -> "AsyncEngine":
        from aserve.engine.engine import Engine  # the heavy import, only when building one
        return cls(Engine(args))

    # ----------------------------------------------------------------- life cycle
    def start(self) -> None:
        """Start the step driver on the running loop."""
        if self._driver is not None:
            return
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._died = asyncio.Event()
        self._driver = loop.create_task(self._run(), name="aserve-step-driver")
        workers = getattr(self.engine, "workers", None)
        if workers is not None:  # a tensor-parallel rank failed: this engine can do nothing more
            workers.add_failure_listener(lambda exc: loop.call_soon_threadsafe(self._die, exc))

    async def shutdown(self) -> None:
        """Stop stepping, end every open stream, and release the engine thread. The engine is
        left empty (its requests aborted, no step in flight) unless it died."""
        if self._driver is not None:
            self._driver.cancel()
            try:
                await self._driver
            except (asyncio.CancelledError, Exception):
                pass
            self._driver = None
        self._fail_all(EngineDeadError("The server is shutting down."))
        loop = asyncio.get_running_loop()
        if self._dead is None:  # after the step in flight (one thread: it queues behind it)
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
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        accepted = asyncio.get_running_loop().create_future()
        self._post(_Add(request_id, prompt, params,
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
        self._post(_Call(fn, done))
        return await done

    def add_finished_listener(self, listener: Callable[[RequestOutput], None]) -> None:
        """Call listener(output) with the final output of every request (metrics use it)."""
        self._finished_listeners.append(listener)

    def get_stats(self):
        # Counters and lengths only, read while the engine thread may be stepping: no lock (a
        # scrape never waits for a step), and each value is read whole.
        return self.engine.get_stats()

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests taken but not yet scheduled: on their way to the engine, or in its queue."""
        return self.get_stats().num_waiting + self._num_pending_adds

    # ----------------------------------------------------------------- the step driver
    def _post(self, op) -> None:
        self._inbox.append(op)
        if self._wakeup is not None:
            self._wakeup.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            turn = None  # the engine thread's turn in flight
            while True:
                if turn is None:
                    if not self._inbox and not self._engine_busy:
                        self._wakeup.clear()
                        await self._wakeup.wait()
                        continue
                    turn = self._start_turn(loop)
                ops = self._in_flight
                outputs, results, stepped, self._engine_busy = await turn
                self._in_flight = []
                self._num_pending_adds -= sum(isinstance(op, _Add) for op in ops)
                for future, result, error in results:
                    if not future.done():  # an add whose caller left is cancelled already
                        future.set_exception(error) if error is not None else future.set_result(result)
                self.num_steps += stepped
                # The next turn starts before this one's outputs go out: the engine thread steps
                # (and the GPU runs) while the loop writes them to their streams, instead of
                # waiting for the last write. Outputs are snapshots, safe to read meanwhile;
                # what the handlers post now (aborts, adds) waits for the turn after. A turn that
                # produced nothing (a plan with no tokens) must not spin: the next waits 1 ms.
                turn = self._start_turn(loop) if outputs and (self._inbox or self._engine_busy) else None
                await self._dispatch(outputs)
                await asyncio.sleep(0 if outputs else 0.001)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the engine itself failed: no step can be trusted now
            logger.exception("The engine's step driver failed; the server can serve no more requests")
            self._die(exc)

    def _start_turn(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        ops, self._inbox = self._inbox, []
        self._in_flight = ops
        return loop.run_in_executor(self._executor, self._engine_turn, ops)

    def _engine_turn(self, ops: list):
        """In the engine thread: apply the adds, aborts and calls queued since the last turn, in
        order, then run one step when there is work. A failed forward or sampler ends that
        step's requests with the error (Engine.step_gen); every other request carries on."""
        engine = self.engine
        results = []
        for op in ops:
            if isinstance(op, str):
                if op not in engine.requests:   # it finished first: nothing to abort
                    continue
                try:
                    engine.abort_request(op)
                except Exception:  # an abort must never take the engine down with it
                    logger.exception("aborting request %s failed", op)
                else:  # logged here, where it happens: the log and /metrics' count agree
                    logger.info("Aborted request %s.", op)
            elif isinstance(op, _Add):
                try:
                    engine.add_request(op.request_id, op.prompt, op.params, arrival_time=op.arrival_time)
                except Exception as exc:  # a bad request: its own 400 (or 500), nobody else's
                    results.append((op.accepted, None, exc))
                else:
                    results.append((op.accepted, None, None))
            else:
                try:
                    results.append((op.done, op.fn(), None))
                except Exception as exc:
                    results.append((op.done, None, exc))
        stepped = engine.has_unfinished_requests()
        outputs = run_step_gen(engine.step_gen()) if stepped else []
        return outputs, results, int(stepped), engine.has_unfinished_requests()

    def _empty_engine(self) -> None:
        """In the engine thread: abort every request left and finish a step still in flight."""
        engine = self.engine
        engine.abort_request(list(engine.requests))
        while engine.has_unfinished_requests():
            run_step_gen(engine.step_gen())

    def _die(self, exc: BaseException) -> None:
        """The engine failed for good: every open request ends with the error, /health turns
        503, and wait_until_dead() returns (the server then exits)."""
        if self._dead is None:
            self._dead = exc
            self._fail_all(EngineDeadError(f"The engine failed: {exc}"))
            if self._driver is not None and not self._driver.done() \
                    and self._driver is not asyncio.current_task():
                self._driver.cancel()   # it may be waiting on a step that will never end
        self._died.set()

    async def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for index, output in enumerate(outputs):
            if index and index % DISPATCH_BATCH == 0:
                await asyncio.sleep(0)
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
            if stream is not None:
                stream._put(output)

    def _fail_all(self, exc: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(exc)
        pending, self._inbox = self._in_flight + self._inbox, []
        self._in_flight = []
        self._num_pending_adds = 0
        for op in pending:
            future = op.accepted if isinstance(op, _Add) else getattr(op, "done", None)
            if future is not None and not future.done():
                future.set_exception(exc)
