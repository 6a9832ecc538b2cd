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
What is not the thread's (the streams, the ops' order, the driver coroutine and its rest) is
engine_driver.py's, shared with an engine in a process of its own (process_async_engine.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

from aserve.engine.engine_driver import EngineDriver
from aserve.engine.engine_ops import Add, apply_op, settle
from aserve.engine.pipeline import run_step_gen
from aserve.engine.request_stream import EngineDeadError, RequestAbortedError, RequestStream

__all__ = ["AsyncEngine", "EngineDeadError", "RequestAbortedError", "RequestStream"]

logger = logging.getLogger("aserve.engine")

# How long shutdown waits for the step in flight of an engine that has died.
_SHUTDOWN_STEP_WAIT_S = 5.0
# After writing a batch of outputs, the loop leaves the GIL to the engine thread this many
# times as long as the writing took, when that is longer than a step (module docstring). 0
# takes outputs as fast as the loop can. bench/RESULTS.md has the figures that chose it
# (2026-12-02: 4; 2026-12-03, ninth session: 6, once the chunk sinks made a round of writes
# cheaper than the rest of a hand-over); ASERVE_DELIVERY_REST overrides it, for benchmarks.
DELIVERY_REST = 6.0
# How long the engine thread waits before stepping again after a step that did nothing (a
# structured-output request waiting for its grammar).
_IDLE_STEP_WAIT_S = 0.001


class AsyncEngine(EngineDriver):
    """Owns an Engine and the thread that steps it; EngineDriver feeds that thread and delivers
    its outputs."""

    def __init__(self, engine):
        super().__init__(engine, DELIVERY_REST)
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
        self._engine_loop_done: Optional[asyncio.Future] = None
        # The engine records vLLM's request and step statistics for /metrics (engine/stats.py).
        enable_stats = getattr(engine, "enable_stats", None)
        self.stats = enable_stats() if enable_stats is not None else None

    @classmethod
    def from_engine_args(cls, args) -> "AsyncEngine":
        from aserve.engine.engine import Engine  # the heavy import, only when building one
        return cls(Engine(args))

    # ----------------------------------------------------------------- life cycle
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

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn() in the engine thread between two steps (where the Engine may be touched)."""
        if not self.is_running:
            return fn()  # no engine thread runs: this thread may touch it
        return await super().call(fn)

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

    def _fail_all(self, exc: BaseException) -> None:
        super()._fail_all(exc)
        pending = self._taken + list(self._inbox)
        self._inbox.clear()
        self._taken = []
        for op in pending:
            future = op.accepted if isinstance(op, Add) else getattr(op, "done", None)
            if future is not None and not future.done():
                future.set_exception(exc)
