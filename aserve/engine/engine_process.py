"""The engine in a process of its own (`python -m aserve --engine-process`): this module is that
process's side; process_async_engine.py is the server's.

In one process, the event loop's HTTP work and the engine's host work (scheduling, launching
steps, detokenizing) take turns on one GIL: at all-at-once load on a fast GPU the engine is
bound by its host work, and every request's intake and every chunk written is time the engine
does not step (bench/RESULTS.md: the server at 0.53-0.59x of offline A on an H100). Here the
engine steps in its own interpreter, as vLLM's engine core does, and the two exchange pickled
messages over two pipes:

  server -> engine  a list of ops at a time, each pickled alone: Add (its `accepted` the op's
                    number), an abort (the request id), EngineCallOp, WANT_OUTPUTS, STOP
  engine -> server  ("ready", EngineInfo) once loaded, or ("failed", error); then
                    ("batch", outputs, results, adds, steps, EngineStats) when the server asked
                    for outputs and there are some, the outputs as output_wire.py encodes them;
                    ("dead", error) if the engine fails

A batch holds one output per request however many steps it spans (Engine.defer_outputs), as
the in-process engine thread hands them over, so a server that takes outputs more slowly than
the engine steps gets fewer, larger ones. The process ignores SIGINT (the terminal sends it to
the whole group; the server decides) and ends when told to stop or when the server's end of
the pipe closes (the server died).
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from aserve.engine.engine_ops import Add, Call, apply_op
from aserve.engine.gc_policy import serve_with_fewer_collections
from aserve.engine.output_wire import OutputEncoder
from aserve.engine.pipeline import run_step_gen

logger = logging.getLogger("aserve.engine")

WANT_OUTPUTS = ("want outputs",)   # the server is ready for the next batch
STOP = ("stop",)                   # abort everything, shut the engine down, exit
# How long the engine waits before stepping again after a step that did nothing (a
# structured-output request waiting for its grammar), as the in-process engine thread does.
_IDLE_STEP_WAIT_S = 0.001


@dataclass(frozen=True)
class EngineCall:
    """A call of one of the engine's methods, by name (a closure cannot cross the process
    boundary): AsyncEngine.call(EngineCall("reset_prefix_cache")) runs it between two steps."""

    method: str
    args: tuple = ()


@dataclass
class EngineCallOp:
    """An EngineCall on its way to the engine, with the number its result comes back under."""

    call: EngineCall
    number: int


@dataclass
class EngineInfo:
    """What the server reads of its engine, sent once the engine is loaded."""

    args: Any
    model_config: Any
    cache_config: Any
    scheduler_config: Any
    parallel_config: Any
    device: str
    pooling: bool
    normalize_embeddings: bool


def run_engine_process(args, ops_conn, out_conn, log_level: int, log_format: Optional[str]) -> None:
    """The engine process's main (multiprocessing's spawn target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="aserve-parent-watch",
                     daemon=True).start()
    logging.basicConfig(level=log_level, format=log_format or logging.BASIC_FORMAT, datefmt="%H:%M:%S")
    logging.getLogger("aserve").setLevel(log_level)
    try:
        from aserve.engine.engine import Engine

        engine = Engine(args)
        engine.defer_outputs = True
        engine.enable_stats()
        out_conn.send(("ready", EngineInfo(
            args, engine.model_config, engine.cache_config, engine.scheduler_config,
            engine.parallel_config, str(engine.device), engine.pooling, engine.normalize_embeddings)))
    except BaseException as exc:  # noqa: BLE001 - the server shows it and exits
        logger.exception("the engine failed to load")
        out_conn.send(("failed", _sendable(exc)))
        return
    if engine.workers is not None:   # a tensor-parallel rank failed: this engine can do nothing more
        engine.workers.add_failure_listener(lambda exc: _die(out_conn, exc))
    # What loading built (the model's modules, torch's and transformers' state) is frozen out of
    # the collector and the youngest generation is collected less often, as in the server's
    # process (gc_policy.py): with CPython's defaults a served burst of 1000 requests made
    # ~200 young and ~20 middle collections here and a full one of ~140 ms.
    serve_with_fewer_collections()
    try:
        _serve(engine, ops_conn, out_conn)
    except BaseException as exc:  # noqa: BLE001 - the engine's own failure: the server must know
        logger.exception("the engine failed")
        _die(out_conn, exc)
    _shut_down(engine)


def _exit_with_parent(parent_pid: int) -> None:
    """End this process if the server's is gone (killed while the model loaded, or at any
    time without closing the pipe first)."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _take_ops(ops_conn, timeout: Optional[float]) -> list:
    """The ops the server has sent, waiting up to `timeout` (None: until some come) for the
    first; the pipe's end (the server died) reads as STOP. Read between steps, in the engine's
    own thread: a poll is one system call, and no reader thread waits for the GIL."""
    messages: list = []
    try:
        if ops_conn.poll(timeout):
            messages.extend(ops_conn.recv())
            while ops_conn.poll(0):
                messages.extend(ops_conn.recv())
    except (EOFError, OSError):
        return [STOP]
    return [pickle.loads(message) for message in messages]   # each pickled by the server alone


def _serve(engine, ops_conn, out_conn) -> None:
    """Apply the server's ops between steps, step while there is work, and send what came of
    it whenever the server is ready for it (the in-process AsyncEngine._engine_loop's pattern)."""
    outputs: list = []
    results: list = []           # (op number, result, error) of adds and calls
    adds = steps = 0
    wants_outputs = False
    idle_wait: Optional[float] = 0.0
    encoder = OutputEncoder()
    while True:
        for op in _take_ops(ops_conn, idle_wait):
            if op == WANT_OUTPUTS:
                wants_outputs = True
            elif op == STOP:
                return
            elif isinstance(op, EngineCallOp):
                apply_op(engine, Call(functools.partial(getattr(engine, op.call.method), *op.call.args),
                                      op.number), results)
            else:
                if isinstance(op, Add):
                    adds += 1
                else:   # an abort: its request may never have a final output to end it there
                    encoder.forget(op)
                apply_op(engine, op, results)   # an Add (its `accepted` is its number) or an abort
        progressed = False
        if engine.has_unfinished_requests():
            tokens_before = engine.prompt_tokens_total + engine.generation_tokens_total
            outputs += run_step_gen(engine.step_gen())
            steps += 1
            progressed = tokens_before != engine.prompt_tokens_total + engine.generation_tokens_total
        # Sent when asked for, or unasked when the engine runs out of work (a run's last
        # tokens: the server may be resting, to let outputs gather, and would wait them out).
        if (outputs or results or steps) and (wants_outputs or not engine.has_unfinished_requests()):
            wants_outputs = False
            outputs += engine.take_unreported_outputs()
            out_conn.send(("batch", encoder.encode(outputs), [(n, r, _sendable(e) if e is not None else None)
                                              for n, r, e in results], adds, steps, engine.get_stats()))
            outputs, results, adds, steps = [], [], 0, 0
        # Nothing to step, or a step that did nothing: wait for the server's next ops.
        idle_wait = 0.0 if progressed else (_IDLE_STEP_WAIT_S if engine.has_unfinished_requests() else None)


def _die(out_conn, exc: BaseException) -> None:
    """Tell the server the engine failed for good, and end this process (a step may be stuck in
    a collective with a dead rank, which nothing else would end)."""
    try:
        out_conn.send(("dead", _sendable(exc)))
    except (OSError, ValueError):
        pass
    logging.shutdown()
    os._exit(1)


def _shut_down(engine) -> None:
    """Abort what is left, finish a step in flight, end the worker ranks."""
    started = time.monotonic()
    try:
        engine.abort_request(list(engine.requests))
        while engine.has_unfinished_requests():
            run_step_gen(engine.step_gen())
        engine.shutdown()
    except Exception:
        logger.exception("the engine's shutdown failed")
    logger.debug("engine process shut down in %.2f s", time.monotonic() - started)


def _sendable(exc: BaseException) -> BaseException:
    """exc itself if it survives pickling (a ValueError does), else a RuntimeError saying what
    it was: the server turns it into the request's error."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception type, any pickling failure
        return RuntimeError(f"{type(exc).__name__}: {exc}")
