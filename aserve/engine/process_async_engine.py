"""ProcessAsyncEngine: the EngineDriver (engine_driver.py) of an engine that steps in a process
of its own (engine_process.py says why and what crosses the pipes).

To the server it is an engine like the in-process one (async_engine.py): the same add_request,
abort, call, streams and driver coroutine, which dispatches each batch to the streams and then
rests, for a shorter while than in one process, so that at saturation each batch spans several
steps: fewer, fuller chunks to write, and fewer outputs for the engine process to send. What
differs is below the driver: ops go to the engine process pickled, through a
sender thread (a burst of adds never blocks the loop on a full pipe), and batches come back
through a reader thread, in output_wire.py's form (plain streaming requests run as DELTA there
and are joined back here; with text_here, their text is made here: server_detokenizer.py).
`engine` is an EngineView of what the server reads: the configs, the tokenizer (loaded here
while the engine process loads the model) and the engine's newest counters; a call runs an
EngineCall, a method of the engine by name.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import logging
import multiprocessing
import pickle
import threading
from typing import Any, Optional

from aserve.engine.engine_driver import EngineDriver
from aserve.engine.engine_ops import Add, Call
from aserve.engine.engine_process import (DETACH, STOP, WANT_OUTPUTS, EngineCall, EngineCallOp, EngineInfo,
                                          run_engine_process)
from aserve.engine.output_wire import OutputDecoder
from aserve.engine.request_stream import EngineDeadError
from aserve.engine.stats import EngineStats, EngineStatsRecorder
from aserve.structured_output.backend import GrammarBackend

logger = logging.getLogger("aserve.engine")

_WANT_MESSAGE, _STOP_MESSAGE, _DETACH_MESSAGE = (pickle.dumps(m) for m in (WANT_OUTPUTS, STOP, DETACH))
# The driver's rest after a delivery (engine_driver.py), shorter than in one process: with the engine in another
# process the rest no longer leaves it the GIL, it only lets a stream's tokens gather into fewer
# chunks (and fewer outputs for the engine process to send). On an H100 model A served all at
# once (512 sequences a step) as fast at 2 as at 6, 113.0k against 112.6k out tok/s over two
# rounds, with half the ITL (mean 28-29 against 55-56 ms, p99 93-95 against 118-120); at 1 it
# lost 5%; in a later call, one round each, 113.0k at 2 against 115.8k at 6 (ITL 25 against
# 63 ms; bench/RESULTS.md, 2026-12-06).
PROCESS_DELIVERY_REST = 2.0
# How long shutdown waits for the engine process to end before it is killed.
_SHUTDOWN_WAIT_S = 30.0
# The pipes' buffers, widened from Linux's 64 KiB (Linux's default limit for a process without
# privileges is 1 MiB, /proc/sys/fs/pipe-max-size). A batch of 512 outputs is ~60-70 KB, ~260 KB
# with its requests' prompts: a write larger than the buffer returns only once the reader has
# taken the rest, and the server's reader thread reads a chunk each time it gets the GIL from a
# busy event loop (up to the 5 ms switch interval). The engine process stepped none meanwhile.
# Measured (CPU VM, a reader thread beside a busy main thread): sending 165 KB took 8.5-12 ms
# (p50) through a 64 KiB pipe, 1.9 ms through a 1 MiB one; 50 KB 1.3 ms against 0.02. Served
# on an H100, outputs taken and sent then cost the engine process 0.19 ms a step, wall equal to
# CPU (0.27-0.29 ms of wall before; bench/RESULTS.md, thirty-second session).
_PIPE_BYTES = 1 << 20


class EngineView:
    """The server's view of an engine in another process: what EngineInfo carried, the
    tokenizer, and get_stats() as of the engine's last batch."""

    def __init__(self, info: EngineInfo, tokenizer):
        self.args, self.model_config = info.args, info.model_config
        self.cache_config, self.scheduler_config = info.cache_config, info.scheduler_config
        self.parallel_config, self.device = info.parallel_config, info.device
        self.pooling, self.normalize_embeddings = info.pooling, info.normalize_embeddings
        self.tokenizer = tokenizer
        # The server's own grammar checks (server/structured_request.py: a grammar that cannot
        # compile is a 400 before anything streams); the engine process compiles its own copy.
        self.grammars = (GrammarBackend(tokenizer, info.model_config.vocab_size)
                         if tokenizer is not None else None)
        self.workers = None            # the engine process watches its own ranks
        self.defer_outputs = True      # always so in the engine process
        self.reset_prefix_cache = EngineCall("reset_prefix_cache")
        self.latest_stats = EngineStats(num_running=0, num_waiting=0, num_used_blocks=0,
                                        num_total_blocks=info.cache_config.num_blocks, kv_cache_usage=0.0,
                                        prompt_tokens_total=0, generation_tokens_total=0, num_preemptions=0)

    def get_stats(self) -> EngineStats:
        return self.latest_stats


def start_engine_process(args, num_clients: int = 1):
    """Spawn the engine process for num_clients API servers; returns it and each server's ends
    of its pipes, (ops connection, batches connection), the first this process's."""
    context = multiprocessing.get_context("spawn")
    engine_ends, server_ends = [], []
    for _ in range(num_clients):
        ops_in, ops_out = context.Pipe(duplex=False)
        batches_in, batches_out = context.Pipe(duplex=False)
        widen_pipe(ops_in)
        widen_pipe(batches_in)
        engine_ends.append((ops_in, batches_out))
        server_ends.append((ops_out, batches_in))
    root = logging.getLogger()
    log_format = root.handlers[0].formatter._fmt if root.handlers and root.handlers[0].formatter else None
    # Not a daemon: a daemonic process may not start the engine's tensor-parallel ranks.
    process = context.Process(
        target=run_engine_process, name="aserve-engine",
        args=(args, engine_ends, logging.getLogger("aserve").getEffectiveLevel(), log_format))
    process.start()
    for ops_in, batches_out in engine_ends:
        ops_in.close()
        batches_out.close()   # this process's copies: a pipe ends (EOFError) when the engine's does
    return process, server_ends


def widen_pipe(conn, size: int = _PIPE_BYTES) -> int:
    """Give the pipe under conn (either end) a buffer of up to `size` bytes, as the system
    allows; returns the size it has (unchanged where it cannot be set: not Linux, or a limit)."""
    if not hasattr(fcntl, "F_SETPIPE_SZ"):
        return 0
    try:
        return fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, size)
    except OSError:   # over pipe-max-size, or this user's pipe pages spent: keep what it has
        try:
            return fcntl.fcntl(conn.fileno(), fcntl.F_GETPIPE_SZ)
        except OSError:
            return 0


class ProcessAsyncEngine(EngineDriver):
    """An EngineDriver over an engine process (module docstring). Built on its own, it starts
    the engine process and stops it at shutdown. Given `pipes` (start_engine_process's ends) it
    drives an engine process started elsewhere, and `process` says whose: the one it stops at
    shutdown, or None (another API server's, api_servers.py: shutdown only detaches).
    text_here: the plain requests' text is made here, not in the engine process
    (server_detokenizer.py), as vLLM's front end makes it: at saturation the engine process is
    what limits a served run, and decoding was ~0.5 ms of its ~4 ms step on an H100 host. With
    two servers sharing the engine process: mean 113.3k out tok/s against 107.3k (model A all at
    once, 3 rounds taking turns, twenty-ninth session). With one server: 120.5k and 116.1k
    against 112.0k and 110.6k, TPOT 2.9 against 3.3 ms, in two of three rounds taking turns; in
    the third, on a host that slowed both, 66.4k against 99.2k (thirty-first session;
    bench/RESULTS.md). An earlier trial that kept one server's text in the engine process (86.5k
    against 95.4k) gave the two servers different clients, warm and cold connections (a fault
    of bench/server_vs_offline.sh, fixed in the thirtieth session). False keeps it in the engine
    process, as before."""

    def __init__(self, args, pipes=None, process=None, text_here: bool = True):
        from aserve.models.loader import create_model_config, load_tokenizer

        if pipes is None:
            process, (pipes,) = start_engine_process(args)
        self._ops_out, self._batches_in = pipes
        self._process = process
        try:
            # The tokenizer loads here while the engine process loads the model.
            tokenizer = None if args.skip_tokenizer_init else load_tokenizer(create_model_config(args))
            info = self._wait_until_loaded()
        except BaseException:
            self._kill()
            raise
        super().__init__(EngineView(info, tokenizer), PROCESS_DELIVERY_REST)
        self.stats = EngineStatsRecorder(info.model_config.max_model_len)
        self._numbers = itertools.count()
        # op number -> (its add's or call's future, an add's request id)
        self._waiting_on: dict[int, tuple[asyncio.Future, Optional[str]]] = {}
        self.text_here = text_here and tokenizer is not None
        self._decoder = OutputDecoder(tokenizer if self.text_here else None)
        self._outbox: list = []
        self._outbox_ready = threading.Condition()
        self._gone: Optional[asyncio.Future] = None
        self._received: list = []        # batches the reader took, for the driver
        self._armed = False              # a WANT_OUTPUTS is on its way or waiting in the engine
        self._arming = threading.Lock()  # guards both, between the reader thread and the loop

    @classmethod
    def from_engine_args(cls, args) -> "ProcessAsyncEngine":
        return cls(args)

    def _wait_until_loaded(self) -> EngineInfo:
        try:
            kind, payload = self._batches_in.recv()
        except EOFError:
            if self._process is None:
                raise RuntimeError("the engine process exited while loading") from None
            self._process.join(5)
            raise RuntimeError(f"the engine process exited while loading (exit code "
                               f"{self._process.exitcode})") from None
        if kind == "failed":
            raise payload
        return payload

    # ----------------------------------------------------------------- life cycle
    def _start_engine_side(self, loop: asyncio.AbstractEventLoop) -> None:
        """The pipes' threads (the engine process steps, and watches its ranks, by itself)."""
        self._gone = loop.create_future()
        threading.Thread(target=self._send_ops, name="aserve-engine-sender", daemon=True).start()
        threading.Thread(target=self._read_batches, args=(loop,), name="aserve-engine-reader",
                         daemon=True).start()

    async def shutdown(self) -> None:
        await self._stop_driver()
        await asyncio.get_running_loop().run_in_executor(None, self._join)
        if self.engine.grammars is not None:
            self.engine.grammars.shutdown()

    def _join(self) -> None:
        if self._process is None:   # another API server's engine: it stops the engine
            return
        self._process.join(_SHUTDOWN_WAIT_S)
        if self._process.is_alive():
            logger.warning("the engine process did not end in %.0f s; killing it", _SHUTDOWN_WAIT_S)
            self._kill()

    def close_unstarted(self) -> None:
        """End the engine process of a driver never started (its server failed to start)."""
        self._kill()

    def _exit_code(self) -> str:
        if self._process is None:
            return ""
        self._process.join(1)
        return f" (exit code {self._process.exitcode})"

    def _kill(self) -> None:
        if self._process is None:
            return
        if self._process.is_alive():
            self._process.kill()
        self._process.join()

    async def call(self, fn) -> Any:
        """Run an EngineCall (an engine method, by name) in the engine process between steps."""
        if not isinstance(fn, EngineCall):
            raise TypeError("an engine in another process runs EngineCall(method, args), not a "
                            f"function: got {fn!r}")
        if not self.is_running:
            raise EngineDeadError(f"The engine is not running: {self._dead or 'not started'}.")
        return await super().call(fn)

    @property
    def num_waiting(self) -> int:
        return self.engine.latest_stats.num_waiting + self._num_pending_adds

    async def refresh_stats(self) -> None:
        """Bring get_stats() and the stats recorder up to date (before /metrics renders them)."""
        if self.is_running:
            self.engine.latest_stats, self.stats = await self.call(EngineCall("stats_snapshot"))

    # ----------------------------------------------------------------- the pipes
    def _post(self, op) -> None:
        """Pickled here, so that what cannot cross to the engine process (an object a Python
        caller attached to its params that does not pickle) fails its own request, not the
        sender thread."""
        number = next(self._numbers)
        future = request_id = None
        if isinstance(op, Add):
            future, request_id = op.accepted, op.request_id
            # Run as DELTA and joined back here, its text made here (output_wire.py), where it can be.
            op = Add(request_id, op.prompt, self._decoder.engine_params(request_id, op.params), op.arrival_time,
                     number)
        elif isinstance(op, Call):
            future = op.done
            op = EngineCallOp(op.fn, number)
        try:
            message = pickle.dumps(op, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - any pickling failure of any field
            if future is None:
                raise
            if request_id is not None:
                self._decoder.forget(request_id)
            future.set_exception(ValueError(f"the request cannot be sent to the engine process "
                                            f"(--engine-process): {exc}"))
            # add_request counts the add as pending after posting it; nothing will settle it.
            self._num_pending_adds -= isinstance(op, Add)
            return
        if future is not None:
            self._waiting_on[number] = (future, request_id)
        elif isinstance(op, str):   # an abort
            self._decoder.forget(op)
        self._send(message)

    def _stop_engine_loop(self) -> None:
        self._stopping = True
        # The engine's starter stops it; another API server only leaves it (its requests aborted).
        self._send(_STOP_MESSAGE if self._process is not None else _DETACH_MESSAGE)

    def _send(self, message: bytes) -> None:
        with self._outbox_ready:
            self._outbox.append(message)
            self._outbox_ready.notify()

    def _send_ops(self) -> None:
        """In a thread: the ops the loop posted (pickled), a list at a time, into the engine's pipe."""
        while True:
            with self._outbox_ready:
                while not self._outbox:
                    self._outbox_ready.wait()
                ops, self._outbox = self._outbox, []
            try:
                self._ops_out.send(ops)
            except (OSError, ValueError):   # the engine process is gone: the reader says so
                return
            if _STOP_MESSAGE in ops or _DETACH_MESSAGE in ops:
                return

    def _read_batches(self, loop: asyncio.AbstractEventLoop) -> None:
        """In a thread: each message of the engine process, handed to the loop."""
        while True:
            try:
                message = self._batches_in.recv()
            except (EOFError, OSError):
                message = ("dead", None)
            if message[0] == "batch":
                with self._arming:
                    self._armed = False
                    self._received.append(message)
            try:
                loop.call_soon_threadsafe(self._on_message, message)
            except RuntimeError:  # the loop is closed: nobody left to tell
                return
            if message[0] == "dead":
                return

    def _arm(self) -> None:
        """Ask the engine for its next batch, unless asked already (self._arming held)."""
        if not self._armed:
            self._armed = True
            self._send(_WANT_MESSAGE)

    def _on_message(self, message) -> None:
        """On the loop: wake the driver for a batch (a batch it did not ask for is the engine's
        last before it idles: it ends the driver's rest); or the engine's end."""
        if message[0] == "batch":
            if self._batch_waiter is not None and not self._batch_waiter.done():
                self._batch_waiter.set_result(None)
            else:
                self._engine_went_idle.set()
        elif not self._gone.done():   # its result: why the engine process ended
            error = message[1]
            if error is None:
                error = (EngineDeadError("The engine process stopped.") if self._stopping else
                         RuntimeError(f"the engine process exited{self._exit_code()}"))
            self._gone.set_result(error)

    def _take_batches(self):
        """Every batch received, as one: outputs in order (a stream keeps the newest, or merges
        deltas), the ops' results with their futures."""
        with self._arming:
            batches, self._received = self._received, []
        outputs, results = [], []
        decode, wanted = self._decoder.decode, self._streams.__contains__
        for _, items, batch_results, adds, steps, stats in batches:
            for item in items:
                output = decode(item, wanted)
                if output is not None:
                    outputs.append(output)
            for number, result, error in batch_results:
                if number not in self._waiting_on:   # failed by a shutdown in between
                    continue
                future, request_id = self._waiting_on.pop(number)
                if error is not None and request_id is not None:   # a refused add
                    self._decoder.forget(request_id)
                results.append((future, result, error))
            self._num_pending_adds -= adds
            self.num_steps += steps
            self.engine.latest_stats = stats
        return outputs, results

    async def _next_batch(self):
        self._engine_went_idle.clear()
        if not self._received:
            self._batch_waiter = asyncio.get_running_loop().create_future()
            with self._arming:
                self._arm()
            await asyncio.wait({self._batch_waiter, self._gone}, return_when=asyncio.FIRST_COMPLETED)
            if not self._batch_waiter.done():
                self._batch_waiter.cancel()
                raise self._gone.result()
        return self._take_batches()

    def _fail_all(self, exc: BaseException) -> None:
        super()._fail_all(exc)
        waiting, self._waiting_on = self._waiting_on, {}
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(exc)
