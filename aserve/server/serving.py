"""The server's life: bind the port, load the model, serve, and end on a signal or a dead engine.

* The port is bound before the model loads, so a busy port fails at once rather than after
  minutes of loading; until the model is ready every route answers 503 ("model_loading"), as
  vLLM's /health does before its engine is up.
* SIGTERM or SIGINT: the server takes no new requests (503 "server_shutting_down", /health
  503 too), logs "draining N requests", lets those finish for at most --shutdown-timeout
  seconds, then aborts what is left (a stream gets OpenAI's error body as its last event and
  [DONE]; a non-streamed request a 503) and exits 0. A second signal exits at once, with
  128 + the signal's number, as a shell reports a process the signal killed.
* An engine that dies keeps answering 503 ("engine_dead") for DEAD_ENGINE_GRACE_S, so clients
  and balancers see why, then serve() returns 1: the process exits non-zero for a supervisor
  to restart it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional

from aserve.engine.engine_driver import EngineDriver
from aserve.engine.request_stream import RequestAbortedError
from aserve.server.app import ServerState, build_app, start_engine
from aserve.server.http_server import start_site

if TYPE_CHECKING:
    from aserve.server.api_servers import ApiServerProcesses

logger = logging.getLogger("aserve.server")

DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0
# An engine that died keeps answering 503 this long before the server exits non-zero.
DEAD_ENGINE_GRACE_S = 3.0
# After the drain, what handlers get to write their last event before their connections close.
_FINAL_WRITE_S = 1.0
# Beyond its drain, how long another API server gets to end before it is killed.
_PEER_EXIT_S = 5.0


async def serve(state: ServerState, host: str, port: int,
                load_engine: Optional[Callable[[], EngineDriver]] = None,
                shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
                peers: Optional["ApiServerProcesses"] = None, reuse_port: bool = False,
                stop_signals: tuple = (signal.SIGINT, signal.SIGTERM)) -> int:
    """Serve state's engine (or, first, the one load_engine() builds, off the loop) on
    host:port until a signal (returns 0) or the engine's death (returns 1). Raises what
    loading raised (after freeing the port).
    With other API servers on the port (api_servers.py): peers, those this one started (it
    stops them with itself, and returns 1 if one dies); reuse_port, to share the port;
    stop_signals, those that stop this one (its starter forwards a terminal's SIGINT)."""
    runner, bound = await start_site(build_app(state), host, port, state.limits,
                                     shutdown_timeout_s=_FINAL_WRITE_S, reuse_port=reuse_port,
                                     unix_path=peers.primary_path if peers is not None else None)
    state.bound_port = bound   # where load_engine starts the other API servers
    if state.listening is not None:
        state.listening.set()
    stop = _StopSignal(stop_signals)
    try:
        if load_engine is not None:
            engine = await _load(load_engine, stop)
            if engine is None:  # stopped while loading: nothing to drain
                return 0
            state.attach(engine)
            start_engine(state)   # (else the app's start ran it: the engine was attached before)
        _log_start(state, host, bound, shutdown_timeout_s)
        died = asyncio.ensure_future(state.async_engine.wait_until_dead())
        stopped = asyncio.ensure_future(stop.wait())
        peer_died = asyncio.ensure_future(peers.wait_for_failure() if peers is not None else asyncio.Future())
        try:
            await asyncio.wait({stopped, died, peer_died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            peer_died.cancel()
        if died.done():
            logger.error("the engine failed (%s); the server exits in %.0f s", died.result(),
                         DEAD_ENGINE_GRACE_S)
            await asyncio.wait({asyncio.ensure_future(stop.wait())}, timeout=DEAD_ENGINE_GRACE_S)
            return 1
        died.cancel()
        if peers is not None:
            peers.stop()
        await drain(state, shutdown_timeout_s)
        if peers is not None:   # the engine stops after every server's drain
            await peers.wait_until_exited(shutdown_timeout_s + _FINAL_WRITE_S + _PEER_EXIT_S)
            if peer_died.done() and not peer_died.cancelled():
                return 1
        return 0
    finally:
        if peers is not None:
            peers.kill()
        if state.ready:
            logger.info("shutting down")
        await runner.cleanup()


async def drain(state: ServerState, timeout_s: float) -> None:
    """Let the requests in flight finish for at most timeout_s, then abort the rest."""
    async_engine, admission = state.async_engine, state.admission
    admission.draining = True

    def in_flight() -> int:
        return async_engine.num_open_streams + admission.preparing

    logger.info("draining %d requests (at most %g s; a second signal exits at once)", in_flight(), timeout_s)
    deadline = time.monotonic() + timeout_s
    while in_flight() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    left = async_engine.abort_all(RequestAbortedError(
        f"The server shut down before this request finished (--shutdown-timeout {timeout_s:g} s).",
        code="server_shutting_down"))
    if left:
        logger.warning("aborted %d requests still running after %g s", left, timeout_s)


class _StopSignal:
    """SIGINT / SIGTERM: the first sets the event, a second exits the process at once."""

    def __init__(self, signals: tuple = (signal.SIGINT, signal.SIGTERM)) -> None:
        self._event = asyncio.Event()
        # The handlers stay for the process's life: a second signal must work during clean-up too.
        for sig in signals:
            try:
                asyncio.get_running_loop().add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
                pass

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._event.is_set():
            logger.warning("%s again: exiting now", sig.name)
            logging.shutdown()
            os._exit(128 + sig)
        logger.info("%s received: shutting down", sig.name)
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


async def _load(load_engine: Callable[[], EngineDriver], stop: _StopSignal) -> Optional[EngineDriver]:
    """Build the engine in a daemon thread (a signal must not wait for a load of minutes);
    None if a signal came first."""
    loop = asyncio.get_running_loop()
    loaded: asyncio.Future = loop.create_future()

    def run() -> None:
        try:
            result = load_engine()
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, raised there
            _settle(loop, loaded, exc=exc)
        else:
            _settle(loop, loaded, result=result)

    threading.Thread(target=run, name="aserve-load", daemon=True).start()
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({loaded, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not loaded.done():
        logger.info("stopped while the model was loading")
        return None
    return loaded.result()


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result=None, exc=None) -> None:
    def settle():
        if not future.done():
            future.set_exception(exc) if exc is not None else future.set_result(result)
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop closed while loading (a signal ended the server)
        pass


def _log_start(state: ServerState, host: str, port: int, shutdown_timeout_s: float) -> None:
    engine = state.async_engine.engine
    sched = engine.scheduler_config
    max_waiting = state.admission.max_waiting or "unbounded"
    logger.info("model %s: dtype %s on %s, max_model_len %d, %d KV blocks of %d tokens",
                state.served_model_name, str(engine.model_config.dtype).removeprefix("torch."),
                engine.device, state.max_model_len, engine.cache_config.num_blocks,
                engine.cache_config.block_size)
    logger.info("scheduler: max_num_seqs %d, max_num_batched_tokens %d, max waiting requests %s; "
                "API key required: %s; keep-alive %g s, shutdown timeout %g s",
                sched.max_num_seqs, sched.max_num_batched_tokens, max_waiting,
                "yes" if state.api_key else "no", state.limits.keep_alive_timeout_s, shutdown_timeout_s)
    if state.sampling_defaults:
        logger.info("sampling defaults from the model's generation config, for what requests leave unset: %s "
                    "(--generation-config vllm: none)", state.sampling_defaults)
    shown_host = f"[{host}]" if ":" in host else host
    print(f"aserve: serving model {state.served_model_name!r} (max_model_len {state.max_model_len}) "
          f"at http://{shown_host}:{port}  (OpenAI API at http://{shown_host}:{port}/v1)", flush=True)
