"""Signals and faults of `python -m aserve` as a process: a bounded drain on SIGTERM/SIGINT
(streams end with an error event and [DONE], other requests with a 503), a second signal
exits at once, and a dead engine makes the process exit non-zero after a short grace."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import orjson
import pytest

from server_fixtures import free_port, subprocess_server, wait_for_health


async def sse_events(resp) -> tuple[list[dict], bool]:
    """The events of a completions stream, and whether it ended with [DONE]."""
    events, done = [], False
    async for line in resp.content:
        line = line.strip()
        if line == b"data: [DONE]":
            done = True
        elif line.startswith(b"data: "):
            events.append(orjson.loads(line[6:]))
    return events, done


async def stream_completion(session, url, max_tokens):
    body = {"prompt": "Tell me a story", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        return await sse_events(resp)


async def plain_completion(session, url, max_tokens):
    body = {"prompt": "Tell me a story", "max_tokens": max_tokens, "ignore_eos": True}
    async with session.post(url + "/v1/completions", json=body) as resp:
        return resp.status, await resp.json()


async def generate_stream(session, url, max_tokens):
    body = {"prompt": "Tell me a story", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    async with session.post(url + "/generate", json=body) as resp:
        return [orjson.loads(line) async for line in resp.content if line.strip()]


async def wait_running(session, url, count):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with session.get(url + "/metrics") as resp:
            text = await resp.text()
        running = next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("aserve:num_requests_running{"))
        if running >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} requests never ran")


IN_FLIGHT_TOKENS = 2000


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_lets_requests_in_flight_finish_and_exits_0(sig):
    with subprocess_server("--kv-cache-memory-gb", "0.05", "--shutdown-timeout", "60") as (url, proc, log_path):
        async with aiohttp.ClientSession() as session:
            # Long enough that they still run after the checks below (300 tokens of the built-in
            # model were done within the 0.3 s on an idle CPU, and the server had already exited).
            streamed = asyncio.ensure_future(stream_completion(session, url, IN_FLIGHT_TOKENS))
            plain = asyncio.ensure_future(plain_completion(session, url, IN_FLIGHT_TOKENS))
            await wait_running(session, url, 2)
            proc.send_signal(sig)
            await asyncio.sleep(0.3)
            # Draining: nothing new is taken, and /health tells balancers so.
            status, body = await plain_completion(session, url, 4)
            assert status == 503 and body["error"]["code"] == "server_shutting_down"
            async with session.get(url + "/health") as resp:
                assert resp.status == 503
            events, done = await streamed
            status, body = await plain
        assert done and events[-1]["choices"][0]["finish_reason"] == "length"
        assert status == 200 and body["usage"]["completion_tokens"] == IN_FLIGHT_TOKENS
        assert proc.wait(30) == 0
        with open(log_path) as f:
            log = f.read()
    assert "draining 2 requests" in log
    assert "Traceback" not in log


async def test_past_the_shutdown_timeout_what_is_left_is_aborted_with_an_answer():
    timeout = 1.0
    with subprocess_server("--kv-cache-memory-gb", "0.05", "--shutdown-timeout", str(timeout)) \
            as (url, proc, log_path):
        async with aiohttp.ClientSession() as session:
            streamed = asyncio.ensure_future(stream_completion(session, url, 2000))
            plain = asyncio.ensure_future(plain_completion(session, url, 2000))
            generated = asyncio.ensure_future(generate_stream(session, url, 2000))
            await wait_running(session, url, 3)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            events, done = await streamed
            status, body = await plain
            lines = await generated
        assert proc.wait(30) == 0
        took = time.monotonic() - start
        with open(log_path) as f:
            log = f.read()
    assert took < timeout + 10, f"the shutdown took {took:.0f} s"
    assert done and events[-1]["error"]["code"] == "server_shutting_down"   # then [DONE]
    assert set(events[-1]["error"]) == {"message", "type", "param", "code"}
    assert status == 503 and body["error"]["code"] == "server_shutting_down"
    assert lines[-1]["error"]["code"] == "server_shutting_down"
    assert "draining 3 requests" in log and "aborted 3 requests" in log
    assert "Traceback" not in log


async def test_a_second_signal_exits_at_once():
    with subprocess_server("--kv-cache-memory-gb", "0.05", "--shutdown-timeout", "120") as (url, proc, _):
        async with aiohttp.ClientSession() as session:
            streamed = asyncio.ensure_future(stream_completion(session, url, 2000))
            await wait_running(session, url, 1)
            proc.send_signal(signal.SIGINT)
            await asyncio.sleep(0.5)
            assert proc.poll() is None  # draining, for up to 120 s
            start = time.monotonic()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 128 + signal.SIGINT
            assert time.monotonic() - start < 5
            with pytest.raises(aiohttp.ClientError):
                await streamed


ENGINE_DEATH = """
import sys
import aserve.engine.engine as engine_module

class Panic(BaseException):  # as a tokenizer's PanicException: not an Exception
    pass

def process(self, *args, **kwargs):
    raise Panic("injected panic in output processing")

engine_module.Engine.process = process
from aserve.server.cli import main
main(sys.argv[1:])
"""


async def test_a_dead_engine_answers_503_then_the_process_exits_1(tmp_path):
    script = tmp_path / "dying_server.py"
    script.write_text(ENGINE_DEATH)
    port = free_port()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    log = open(tmp_path / "log", "w+")
    proc = subprocess.Popen([sys.executable, str(script), "--kv-cache-memory-gb", "0.05", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=repo,
                            env=dict(os.environ, PYTHONPATH=repo))
    try:
        url = f"http://localhost:{port}"
        wait_for_health(url, proc, log.name)
        async with aiohttp.ClientSession() as session:
            status, body = await plain_completion(session, url, 4)
            assert status == 503 and body["error"]["code"] == "engine_dead"
            async with session.get(url + "/health") as resp:
                assert resp.status == 503 and (await resp.json())["error"]["code"] == "engine_dead"
        assert proc.wait(30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
