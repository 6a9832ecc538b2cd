"""Several API server processes in front of one engine process (--api-server-count N, as vLLM's).

One server process takes a burst of requests one at a time: on an H100 a burst of 1000 reached
the handlers over 190-400 ms (HTTP parsing, validation, the first chunks of the early streams),
and until the last arrived the engine stepped with part of its batch (bench/RESULTS.md,
2026-12-06). N processes share that work, and the work of making their streams' text (which
every server over an engine process makes: ProcessAsyncEngine's text_here). Whether that pays
depends on the host: on the H100 hosts measured so far it did not on average
(api_server_count), so the default stays 1, as vLLM's.

* The first (the one started) binds the port, starts the engine process with a pair of pipes
  per API server, then the others (spawned: ApiServerProcesses), and answers /health while the
  model loads. Each of the others binds the same port once its engine is ready (SO_REUSEPORT:
  the kernel spreads new connections over the listening processes). The first refuses a port
  that anything holds already, as a single server would: with SO_REUSEPORT it could otherwise
  bind beside another server of the same user, and split the connections with it.
* Each drives the engine through its own pipes (ProcessAsyncEngine): its requests' outputs come
  back to it alone (engine_process.py).
* State that lives in one process stays in the first: /v1/responses' store and background
  runs, which the others reach over a Unix socket (responses_proxy.py). /load and the
  waiting-queue bound (--max-waiting-queue-length) are each process's own; /metrics is the
  engine's, the same from any.
* A signal to the first stops all (it forwards SIGTERM; the others ignore a terminal's SIGINT):
  each drains its own requests, then the engine stops. If another dies, the first shuts down
  and exits 1, for a supervisor to restart the whole server; if the first dies, the others
  and the engine process exit too.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Optional

logger = logging.getLogger("aserve.server")

# How long the others may take to start once the engine has loaded (each loads a tokenizer).
_START_TIMEOUT_S = 120.0


def api_server_count(flag: Optional[int], engine_process: Optional[bool]) -> int:
    """--api-server-count as given, else 1, as vLLM's default. On H100 hosts of 16 cores, model A
    served all at once from 4 client processes: 2 servers were no faster than one in the
    twenty-eighth session (means 66.9k against 69.0k out tok/s); in the twenty-ninth, with their
    streams' text made in the servers, 2 averaged 107.4k and one (text in the engine process)
    108.1k over three calls, the calls disagreeing by +-8%: bench/RESULTS.md, 2026-12-06."""
    if flag is None:
        return 1
    if flag < 1:
        raise ValueError(f"--api-server-count must be at least 1, got {flag}.")
    if flag > 1 and engine_process is False:
        raise ValueError("--api-server-count above 1 runs the engine in a process of its own: "
                         "drop --no-engine-process.")
    return flag


def tag_log_lines_with_pid() -> None:
    """Each line says which process wrote it, as vLLM's "(APIServer pid=N)"."""
    for handler in logging.getLogger().handlers:
        if handler.formatter is not None and "%(process)d" not in (handler.formatter._fmt or ""):
            handler.setFormatter(logging.Formatter(
                "(APIServer pid=%(process)d) " + (handler.formatter._fmt or "%(message)s"),
                handler.formatter.datefmt))


class ApiServerProcesses:
    """The other API servers (second to last), seen from the first: started once the port is
    bound and the engine process spawned, told to stop with the first, watched for an early end."""

    def __init__(self, ns, engine_args):
        self._ns, self._engine_args = ns, engine_args
        self._processes: list = []
        self._listening: list = []
        self._stopping = False
        self._socket_dir = tempfile.mkdtemp(prefix="aserve-")
        self.primary_path = os.path.join(self._socket_dir, "primary.sock")   # responses_proxy.py

    def start(self, port: int, pipes: list) -> None:
        """Spawn one API server per pair of engine pipes (start_engine_process's), on port."""
        context = multiprocessing.get_context("spawn")
        for index, pipe in enumerate(pipes, start=1):
            listening = context.Event()
            process = context.Process(target=run_api_server, name=f"aserve-api-server-{index}",
                                      args=(self._ns, self._engine_args, port, pipe, self.primary_path,
                                            listening))
            process.start()
            for conn in pipe:   # the child's now: its end, not this process's copy, closes the pipe
                conn.close()
            self._processes.append(process)
            self._listening.append(listening)

    def wait_until_listening(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Block until every one listens on the port (then the server is ready: a client's
        connections opened at once spread over all of them); raises if one ends first."""
        deadline = time.monotonic() + timeout_s
        for index, (process, listening) in enumerate(zip(self._processes, self._listening), start=1):
            while not listening.wait(0.1):
                if process.exitcode is not None:
                    raise RuntimeError(f"API server {index} exited while starting (exit code "
                                       f"{process.exitcode})")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"API server {index} did not start in {timeout_s:.0f} s")

    def stop(self) -> None:
        """Ask each to drain and end (as a signal to the first does)."""
        self._stopping = True
        for process in self._processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    async def wait_for_failure(self) -> None:
        """Returns once one has ended that was not asked to (the server then shuts down)."""
        while True:
            for index, process in enumerate(self._processes, start=1):
                if process.exitcode is not None and not self._stopping:
                    logger.error("API server %d (pid %d) exited (exit code %s); the server shuts down",
                                 index, process.pid, process.exitcode)
                    return
            await asyncio.sleep(0.2)

    async def wait_until_exited(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(p.is_alive() for p in self._processes) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.kill()

    def kill(self) -> None:
        for process in self._processes:
            if process.is_alive():
                logger.warning("API server pid %d did not end; killing it", process.pid)
                process.kill()
            process.join(1)

    def remove_socket_dir(self) -> None:
        shutil.rmtree(self._socket_dir, ignore_errors=True)


def run_api_server(ns, engine_args, port: int, pipes, primary_path: str, listening) -> None:
    """An API server other than the first (multiprocessing's spawn target): serve ns's routes
    on port, over the engine process at the end of pipes, until SIGTERM or the engine's end."""
    from aserve.engine.engine_process import exit_with_parent
    from aserve.engine.process_async_engine import ProcessAsyncEngine
    from aserve.server.cli import _run, configure_logging, load_chat_template, server_state_from
    from aserve.server.serving import serve

    # The terminal's SIGINT goes to the whole group: the first server forwards it as SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), name="aserve-parent-watch",
                     daemon=True).start()
    configure_logging(ns.log_level, ns.log_config_file)
    tag_log_lines_with_pid()
    state = server_state_from(ns, load_chat_template(ns.chat_template))
    state.responses_primary, state.listening = primary_path, listening
    state.log_stats = False   # the engine's, which the first server logs already
    try:
        state.attach(ProcessAsyncEngine(engine_args, pipes))
    except Exception as exc:  # noqa: BLE001 - the first server reports the engine's failure
        logger.debug("the engine did not load: %s", exc)
        os._exit(1)
    # Port bound only now, with the engine ready: until then new connections go to the others.
    status = _run(serve(state, ns.host, port, shutdown_timeout_s=ns.shutdown_timeout,
                        reuse_port=True, stop_signals=(signal.SIGTERM,)))
    logging.shutdown()
    os._exit(status)

