"""AsyncEngine: the Engine driven by one coroutine on the server's event loop.

The step driver sleeps while there is no work and wakes when a request arrives. Each step's
cheap bookkeeping (schedule, process) runs on the loop; the model forward (Engine.execute)
runs in a single worker thread, so the loop keeps answering HTTP (and /health) while the
model computes: torch releases the GIL inside its kernels, and on GPU the thread simply waits
on the device. One thread, because the engine's execute must never run twice at once.

Each request gets a RequestStream: an async iterator of its cumulative RequestOutputs.
Outputs are cumulative, so the stream keeps only the newest one: a slow consumer skips
intermediate states instead of growing a queue, and never misses the final state.
Closing a stream before it finished (the consumer was cancelled, the client went away)
aborts the request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Optional, Union

from aserve.engine.pipeline import resume_step
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
    """The request was aborted before it finished."""


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
    """Owns an Engine and the coroutine that steps it; the server's only way into the engine."""

    def __init__(self, engine):
        self.engine = engine
        self._streams: dict[str, RequestStream] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aserve-execute")
        self._wakeup: Optional[asyncio.Event] = None
        self._driver: Optional[asyncio.Task] = None
        self._dead: Optional[BaseException] = None
        self._died: Optional[asyncio.Event] = None
        self._finished_listeners: list[Callable[[RequestOutput], None]] = []
        self.num_steps = 0

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
        """Stop stepping, end every open stream, and release the worker thread."""
        if self._driver is not None:
            self._driver.cancel()
            try:
                await self._driver
            except (asyncio.CancelledError, Exception):
                pass
            self._driver = None
        self._fail_all(EngineDeadError("The server is shutting down."))
        loop = asyncio.get_running_loop()
        # Wait for a forward still in flight without blocking the loop while it ends; a dead
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
    def add_request(self, request_id: str, prompt: Union[str, list[int], TokenizedPrompt],
                    params: SamplingParams, arrival_time: Optional[float] = None) -> RequestStream:
        """Queue a request and return its stream. ValueError (a bad request) passes through."""
        if not self.is_running:
            raise EngineDeadError(f"The engine is not running: {self._dead or 'not started'}.")
        if request_id in self._streams:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        self.engine.add_request(request_id, prompt, params,
                                arrival_time=time.monotonic() if arrival_time is None else arrival_time)
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        self._wakeup.set()
        return stream

    async def generate(self, request_id: str, prompt: Union[str, list[int]],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Convenience: an async generator of the request's outputs; aborts when left early."""
        stream = self.add_request(request_id, prompt, params)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Abort a request (frees its blocks); unknown or finished ids are ignored."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        if not stream.finished:  # aborted by someone else than its consumer: wake the consumer
            stream._fail(RequestAbortedError(f"Request {request_id} was aborted."))
        try:
            self.engine.abort_request(request_id)
        except Exception:  # an abort must never take the caller down with it
            logger.exception("aborting request %s failed", request_id)
        logger.info("Aborted request %s.", request_id)

    def add_finished_listener(self, listener: Callable[[RequestOutput], None]) -> None:
        """Call listener(output) with the final output of every request (metrics use it)."""
        self._finished_listeners.append(listener)

    def get_stats(self):
        return self.engine.get_stats()

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    # ----------------------------------------------------------------- the step driver
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        try:
            while True:
                if not engine.has_unfinished_requests():
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                # Scheduling and output processing run here, on the loop; the model work (the
                # forward, waiting for the GPU) in the worker thread. A failed forward ends that
                # step's requests with the error; every other request carries on. With async
                # scheduling the next step is already on the GPU while this one's outputs go out.
                outputs = await self._drive(engine.step_gen(), loop)
                self.num_steps += 1
                await self._dispatch(outputs)
                # Let handlers write what this step produced before the next forward starts
                # (the executor future already yields once; this keeps fairness when a step
                # produced nothing, e.g. a plan with no tokens, instead of a busy spin).
                await asyncio.sleep(0 if outputs else 0.001)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the engine itself failed: no step can be trusted now
            logger.exception("The engine's step driver failed; the server can serve no more requests")
            self._die(exc)

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

    async def _drive(self, gen, loop) -> list[RequestOutput]:
        """Run a step generator (Engine.step_gen), its model work in the worker thread."""
        work, outputs = resume_step(gen, started=False)
        while work is not None:
            try:
                result = await loop.run_in_executor(self._executor, work)
            except Exception as exc:
                work, outputs = resume_step(gen, error=exc)
            else:
                work, outputs = resume_step(gen, result)
        return outputs

    async def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for index, output in enumerate(outputs):
            if index and index % DISPATCH_BATCH == 0:
                await asyncio.sleep(0)
            stream = self._streams.get(output.request_id)
            if output.finished:
                self._streams.pop(output.request_id, None)
                for listener in self._finished_listeners:
                    try:
                        listener(output)
                    except Exception:
                        logger.exception("a finished-request listener failed")
            if stream is not None:
                stream._put(output)

    def _fail_all(self, exc: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(exc)
