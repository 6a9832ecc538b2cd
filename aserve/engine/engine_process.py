"""The engine in a process of its own (`python -m aserve --engine-process`): this module is that
process's side; process_async_engine.py is the server's.

In one process, the event loop's HTTP work and the engine's host work (scheduling, launching
steps, detokenizing) take turns on one GIL: at all-at-once load on a fast GPU the engine is
bound by its host work, and every request's intake and every chunk written is time the engine
does not step (bench/RESULTS.md: the server at 0.53-0.59x of offline A on an H100). Here the
engine steps in its own interpreter, as vLLM's engine core does, and the two exchange pickled
messages over two pipes:

  server -> engine  a list of ops at a time, each pickled alone: Add (its `accepted` the op's
                    number), an abort (the request id), EngineCallOp, WANT_OUTPUTS, STOP, DETACH
  engine -> server  ("ready", EngineInfo) once loaded, or ("failed", error); then
                    ("batch", outputs, results, adds, steps, EngineStats) when the server asked
                    for outputs and there are some, the outputs as output_wire.py encodes them;
                    ("dead", error) if the engine fails

Several API server processes (--api-server-count, api_servers.py) may share one engine: each
has its own pair of pipes (a client here), its requests' outputs and its ops' results come
back on its own pipe, and each asks for its batches when it is ready for them. The first
client is the server process that started this one: its STOP ends the engine. Another's DETACH,
or the end of its pipe, aborts its requests and leaves the others served.

A batch holds one output per request however many steps it spans (Engine.defer_outputs), as
the in-process engine thread hands them over, so a server that takes outputs more slowly than
the engine steps gets fewer, larger ones. The process ignores SIGINT (the terminal sends it to
the whole group; the server decides) and ends when told to stop or when the server's end of
the pipe closes (the server died).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing.connection
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
DETACH = ("detach",)               # this client (an API server) is leaving: abort its requests
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


def run_engine_process(args, clients: list, log_level: int, log_format: Optional[str]) -> None:
    """The engine process's main (multiprocessing's spawn target); clients: the engine's ends
    of each API server's pipes, (ops connection, outputs connection), its starter's first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), name="aserve-parent-watch",
                     daemon=True).start()
    if log_format is not None:   # the servers' lines say "(APIServer pid=N)" (api_servers.py)
        log_format = log_format.replace("(APIServer pid=", "(EngineCore pid=")
    logging.basicConfig(level=log_level, format=log_format or logging.BASIC_FORMAT, datefmt="%H:%M:%S")
    # Through the root handler alone: aserve's own (installed on import) would print each line twice.
    aserve_logger = logging.getLogger("aserve")
    aserve_logger.handlers.clear()
    aserve_logger.setLevel(log_level)
    out_conns = [out_conn for _, out_conn in clients]
    try:
        from aserve.engine.engine import Engine

        engine = Engine(args)
        engine.defer_outputs = True
        engine.enable_stats()
        info = EngineInfo(args, engine.model_config, engine.cache_config, engine.scheduler_config,
                          engine.parallel_config, str(engine.device), engine.pooling,
                          engine.normalize_embeddings)
        _send_to_all(out_conns, ("ready", info))
    except BaseException as exc:  # noqa: BLE001 - the server shows it and exits
        logger.exception("the engine failed to load")
        _send_to_all(out_conns, ("failed", _sendable(exc)))
        return
    if engine.workers is not None:   # a tensor-parallel rank failed: this engine can do nothing more
        engine.workers.add_failure_listener(lambda exc: _die(out_conns, exc))
    # What loading built (the model's modules, torch's and transformers' state) is frozen out of
    # the collector and the youngest generation is collected less often, as in the server's
    # process (gc_policy.py): with CPython's defaults a served burst of 1000 requests made
    # ~200 young and ~20 middle collections here and a full one of ~140 ms.
    serve_with_fewer_collections()
    try:
        _serve(engine, [_Client(ops_conn, out_conn) for ops_conn, out_conn in clients])
    except BaseException as exc:  # noqa: BLE001 - the engine's own failure: the servers must know
        logger.exception("the engine failed")
        _die(out_conns, exc)
    _shut_down(engine)


def exit_with_parent(parent_pid: int) -> None:
    """End this process if the one that started it is gone (killed while the model loaded, or
    at any time without closing the pipe first); in a thread of its own."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _send_to_all(out_conns: list, message) -> None:
    for out_conn in out_conns:
        try:
            out_conn.send(message)
        except (OSError, ValueError):   # that server is gone already
            pass


class _Client:
    """One API server's pipes, and what the engine holds for it until it asks for a batch."""

    def __init__(self, ops_conn, out_conn):
        self.ops_conn, self.out_conn = ops_conn, out_conn
        self.outputs: list = []
        self.results: list = []        # (op number, result, error) of its adds and calls
        self.adds = self.steps = 0
        self.wants_outputs = False
        self.request_ids: set[str] = set()   # its requests the engine holds

    def has_news(self) -> bool:
        return bool(self.outputs or self.results or self.steps)

    def send_batch(self, encoder: OutputEncoder, stats) -> None:
        self.wants_outputs = False
        message = ("batch", encoder.encode(self.outputs),
                   [(n, r, _sendable(e) if e is not None else None) for n, r, e in self.results],
                   self.adds, self.steps, stats)
        self.outputs, self.results, self.adds, self.steps = [], [], 0, 0
        try:
            self.out_conn.send(message)
        except (OSError, ValueError):   # its server is gone: its pipe's end detaches it
            pass


def _take_ops(clients: list, timeout: Optional[float]) -> list:
    """(client, op) for each op the servers have sent, waiting up to `timeout` (None: until some
    come) for the first; the end of a client's pipe (its server died) reads as its DETACH. Read
    between steps, in the engine's own thread: a wait is one system call, and no reader thread
    waits for the GIL."""
    taken: list = []
    by_conn = {client.ops_conn: client for client in clients}
    for conn in multiprocessing.connection.wait(list(by_conn), timeout):
        client = by_conn[conn]
        try:
            while True:
                # each op pickled by the server alone
                taken.extend((client, pickle.loads(message)) for message in conn.recv())
                if not conn.poll(0):
                    break
        except (EOFError, OSError):
            taken.append((client, DETACH))
    return taken


def _serve(engine, clients: list) -> None:
    """Apply the servers' ops between steps, step while there is work, and send each server
    what came of it whenever it is ready for it (the in-process AsyncEngine._engine_loop's
    pattern). Returns on the first client's STOP or once every client has detached."""
    owners: dict[str, _Client] = {}   # request id -> the client that added it
    idle_wait: Optional[float] = 0.0
    encoder = OutputEncoder()
    while clients:
        for client, op in _take_ops(clients, idle_wait):
            if client not in clients:   # detached by an op before this one
                continue
            if op == WANT_OUTPUTS:
                client.wants_outputs = True
            elif op == STOP:
                return
            elif op == DETACH:
                _detach(engine, client, clients, owners, encoder)
            elif isinstance(op, EngineCallOp):
                apply_op(engine, Call(functools.partial(getattr(engine, op.call.method), *op.call.args),
                                      op.number), client.results)
            elif isinstance(op, Add):
                client.adds += 1
                apply_op(engine, op, client.results)   # its `accepted` is its number
                if client.results[-1][2] is None:      # taken: its outputs come back to this client
                    owners[op.request_id] = client
                    client.request_ids.add(op.request_id)
            else:   # an abort: its request may never have a final output to end it here
                encoder.forget(op)
                if owners.pop(op, None) is client:
                    client.request_ids.discard(op)
                apply_op(engine, op, client.results)
        if not clients:
            return
        progressed = False
        if engine.has_unfinished_requests():
            tokens_before = engine.prompt_tokens_total + engine.generation_tokens_total
            _route(run_step_gen(engine.step_gen()), owners)
            for client in clients:
                # Only a client with requests here hears of a step: an idle API server that
                # asked for its next batch would otherwise get an empty one after every step.
                if client.request_ids or client.outputs:
                    client.steps += 1
            progressed = tokens_before != engine.prompt_tokens_total + engine.generation_tokens_total
        # Sent when asked for, or unasked when the engine runs out of work (a run's last
        # tokens: the server may be resting, to let outputs gather, and would wait them out).
        idle = not engine.has_unfinished_requests()
        sending = [c for c in clients if c.has_news() and (c.wants_outputs or idle)]
        if sending:
            _route(engine.take_unreported_outputs(), owners)
            stats = engine.get_stats()
            for client in sending:
                client.send_batch(encoder, stats)
        # Nothing to step, or a step that did nothing: wait for the servers' next ops.
        idle_wait = 0.0 if progressed else (None if idle else _IDLE_STEP_WAIT_S)


def _route(outputs: list, owners: dict) -> None:
    """Each output to the client that added its request (a finished one's last)."""
    for output in outputs:
        request_id = output.request_id
        client = owners.get(request_id)
        if client is None:   # its server detached
            continue
        client.outputs.append(output)
        if getattr(output, "finished", True):
            del owners[request_id]
            client.request_ids.discard(request_id)


def _detach(engine, client: _Client, clients: list, owners: dict, encoder: OutputEncoder) -> None:
    """A server left (it shut down, or died): its requests are aborted, the others carry on."""
    clients.remove(client)
    for request_id in client.request_ids:
        owners.pop(request_id, None)
        encoder.forget(request_id)
        apply_op(engine, request_id, [])
    client.request_ids.clear()
    for conn in (client.ops_conn, client.out_conn):
        conn.close()


def _die(out_conns: list, exc: BaseException) -> None:
    """Tell the servers the engine failed for good, and end this process (a step may be stuck in
    a collective with a dead rank, which nothing else would end)."""
    _send_to_all(out_conns, ("dead", _sendable(exc)))
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
