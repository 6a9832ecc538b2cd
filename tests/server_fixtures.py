"""Helpers that start a real aserve server on a free loopback port, for the server tests.

ServerThread runs the whole server (its own uvloop loop, AsyncEngine and aiohttp app) in a
background thread of the test process: clients talk to it over real TCP, while tests may
still look inside (engine stats, fault injection) through `call`. `subprocess_server` starts
`python -m aserve` as a child process, exactly as a user would.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from aserve.config import EngineArgs

# Small enough to allocate at once, big enough for the concurrency test (64 x ~10 blocks).
TEST_NUM_BLOCKS = 2048


def small_engine_args(**overrides) -> EngineArgs:
    """The built-in tiny model with a small KV cache (fast to allocate, easy to watch)."""
    kwargs: dict[str, Any] = dict(model=None, num_gpu_blocks_override=TEST_NUM_BLOCKS, device="cpu")
    kwargs.update(overrides)
    return EngineArgs(**kwargs)


def module_server_and_client(**server_options):
    """The (server, client) fixtures of a test module: one ServerThread for the module, and the
    official `openai` client on it. Use as `server, client = module_server_and_client()`."""
    import pytest

    @pytest.fixture(scope="module")
    def server():
        with ServerThread(**server_options) as s:
            yield s

    @pytest.fixture(scope="module")
    def client(server):
        return server.openai_client()

    return server, client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """A real server in a daemon thread. Use as a context manager, or start() / stop()."""

    def __init__(self, engine_args: Optional[EngineArgs] = None, *, api_key: Optional[str] = None,
                 chat_template: Optional[str] = None, limits=None,
                 tokenizer_chat_template: Any = "keep", tool_call_parser: Optional[str] = None,
                 state_options: Optional[dict] = None, engine_process: bool = False):
        self.engine_args = engine_args or small_engine_args()
        self.engine_process = engine_process   # as --engine-process: the engine in a process of its own
        self.api_key = api_key
        self.chat_template = chat_template
        self.limits = limits  # an HttpLimits, else the defaults
        self.tokenizer_chat_template = tokenizer_chat_template
        self.tool_call_parser = tool_call_parser   # as --enable-auto-tool-choice --tool-call-parser
        # Other ServerState fields (the CLI's flags); the status line every second unless given.
        self.state_options = {"status_interval_s": 1.0, **(state_options or {})}
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.state = None
        self.port: Optional[int] = None
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._stop: Optional[asyncio.Event] = None
        self._thread = threading.Thread(target=self._main, name="aserve-test-server", daemon=True)

    # ------------------------------------------------------------------ public
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    def openai_client(self, api_key: str = "EMPTY", max_retries: int = 0, timeout: float = 60, **kwargs):
        """The official `openai` client on this server; no retries by default, so a failure
        shows as itself."""
        import openai

        return openai.OpenAI(base_url=self.openai_base_url, api_key=api_key, max_retries=max_retries,
                             timeout=timeout, **kwargs)

    @property
    def async_engine(self):
        return self.state.async_engine

    @property
    def model_name(self) -> str:
        return self.state.served_model_name

    def start(self, timeout: float = 180.0) -> "ServerThread":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the test server did not start in time")
        if self._error is not None:
            raise RuntimeError("the test server failed to start") from self._error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def call(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Run fn() on the server's loop (where engine state may be touched) and return its result."""
        async def run():
            result = fn()
            return await result if asyncio.iscoroutine(result) else result
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stats(self):
        return self.call(self.async_engine.get_stats)

    def wait_until(self, predicate: Callable[[Any], bool], timeout: float = 20.0) -> Any:
        """Poll engine stats until predicate(stats) holds; returns the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats) or time.monotonic() > deadline:
                return stats
            time.sleep(0.02)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ the thread
    def _main(self) -> None:
        import uvloop
        try:
            uvloop.run(self._serve())
        except BaseException as exc:  # surfaced to start() / the test
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        from aserve.engine.async_engine import AsyncEngine
        from aserve.server.app import build_app, state_from_engine
        from aserve.server.http_server import start_site

        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.engine_process:
            from aserve.engine.process_async_engine import ProcessAsyncEngine

            async_engine = await asyncio.get_running_loop().run_in_executor(
                None, ProcessAsyncEngine.from_engine_args, self.engine_args)
        else:
            async_engine = AsyncEngine.from_engine_args(self.engine_args)
        if self.tokenizer_chat_template != "keep":  # e.g. None: a model without a chat template
            async_engine.engine.tokenizer.chat_template = self.tokenizer_chat_template
        self.state = state_from_engine(async_engine, api_key=self.api_key, chat_template=self.chat_template,
                                       **self.state_options)
        self.state.tool_call_parser = self.tool_call_parser
        if self.limits is not None:
            self.state.limits = self.limits
        runner, self.port = await start_site(build_app(self.state), "127.0.0.1", 0, self.state.limits)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            _forget_cached_middleware_chains()


def _forget_cached_middleware_chains() -> None:
    """aiohttp caches each route's middleware chain keyed by its application (up to 1024), so a
    stopped test server's app, and the engine and model behind it, stayed alive in the test
    process (every engine of a full run, with its grammar threads). One server per process, as
    in production, never notices the cache."""
    from aiohttp import web_app

    cached = getattr(web_app, "_cached_build_middleware", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()


@contextmanager
def subprocess_server(*args: str, env: Optional[dict] = None, timeout: float = 180.0,
                      preexec_fn: Optional[Callable[[], None]] = None
                      ) -> Iterator[tuple[str, subprocess.Popen, str]]:
    """Run `python -m aserve *args --port <free>`; yield (url, process, log path) once /health is 200.

    The output goes to a file, not a pipe: a pipe nobody reads would block the server when full.
    preexec_fn runs in the child before the server starts (e.g. to lower a resource limit).
    """
    port = free_port()
    cmd = [sys.executable, "-m", "aserve", *args, "--port", str(port)]
    full_env = dict(os.environ, **(env or {}))
    log = tempfile.NamedTemporaryFile("w+", prefix="aserve-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            preexec_fn=preexec_fn)
    url = f"http://localhost:{port}"  # the default --host is localhost
    try:
        wait_for_health(url, proc, log.name, timeout)
        yield url, proc, log.name
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wait_for_health(url: str, proc: subprocess.Popen, log_path: str, timeout: float = 180.0) -> None:
    """Wait until url/health answers 200 (the server binds first and answers 503 while loading)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_read(log_path)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not answer /health in time:\n{_read(log_path)}")
        time.sleep(0.2)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
