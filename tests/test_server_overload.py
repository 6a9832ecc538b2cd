"""Overload and backpressure: a bounded waiting queue answered with 503 and Retry-After, and a
process that runs out of file descriptors keeps serving what it has and recovers."""

from __future__ import annotations

import asyncio
import resource
import socket
import time

import aiohttp
import openai
import pytest

from aserve.server.admission import Admission
from server_fixtures import ServerThread, small_engine_args, subprocess_server

MAX_WAITING = 4
BODY = {"prompt": "Hello", "max_tokens": 48, "ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    with ServerThread(small_engine_args(max_num_seqs=2)) as s:
        s.state.admission = Admission(MAX_WAITING)
        yield s


async def post(session, server, body):
    async with session.post(server.url + "/v1/completions", json=body) as resp:
        return resp.status, resp.headers.get("Retry-After"), await resp.json()


async def test_past_the_waiting_bound_new_requests_get_503_and_accepted_ones_finish(server):
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(post(session, server, BODY) for _ in range(24)))
    accepted = [body for status, _, body in results if status == 200]
    refused = [(retry, body) for status, retry, body in results if status == 503]
    assert len(accepted) + len(refused) == 24
    # At least the waiting queue's worth is taken (more once some run); the rest are refused at once.
    assert len(accepted) >= MAX_WAITING and refused
    assert all(b["usage"]["completion_tokens"] == 48 for b in accepted)  # none dropped
    for retry_after, body in refused:
        assert retry_after == "1"
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "server_overloaded" and body["error"]["type"] == "server_error"
    async with aiohttp.ClientSession() as session:  # the queue drained: taken again
        status, _, body = await post(session, server, BODY)
    assert status == 200, body


async def test_a_burst_as_large_as_the_queue_is_taken_whole(server):
    # Each request counts once while it waits: tokenizing, on its way to the engine, or queued.
    # (It was counted twice on its way to the engine, so a burst of the bound's size got 503s
    # whenever the engine was slow to take requests: here it is held busy while they arrive.)
    engine_busy = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
        server.async_engine.call(lambda: time.sleep(1.5)), server.loop))
    async with aiohttp.ClientSession() as session:
        sent = []
        for _ in range(MAX_WAITING):
            sent.append(asyncio.ensure_future(post(session, server, dict(BODY, max_tokens=4))))
            await asyncio.sleep(0.15)
        results = await asyncio.gather(*sent)
    await engine_busy
    assert [status for status, _, _ in results] == [200] * MAX_WAITING, results


async def test_a_batch_larger_than_the_queue_can_ever_hold_is_a_400(server):
    async with aiohttp.ClientSession() as session:
        status, _, body = await post(session, server, dict(BODY, prompt=["Hi"] * (MAX_WAITING + 1)))
    assert status == 400 and body["error"]["param"] == "prompt"


def test_the_openai_client_sees_the_503_and_its_retries_get_through(server):
    def run(max_retries):
        client = server.openai_client(max_retries=max_retries)
        return client.completions.create(model=server.model_name, prompt=BODY["prompt"],
                                         max_tokens=BODY["max_tokens"], extra_body={"ignore_eos": True})

    async def flood_then(fn):
        # The engine is held busy while the flood arrives, so its requests fill the waiting
        # queue however fast this machine generates (300 tokens took 0.6 s on a quiet one,
        # and the first wave had finished before the client's request came).
        engine_busy = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            server.async_engine.call(lambda: time.sleep(1.5)), server.loop))
        async with aiohttp.ClientSession() as session:
            # 2, then 4 more: more than the queue's bound, for a few seconds.
            flood = []
            for wave in (2, MAX_WAITING):
                flood += [asyncio.ensure_future(post(session, server, dict(BODY, max_tokens=300)))
                          for _ in range(wave)]
                await asyncio.sleep(0.3)
            try:
                return await asyncio.to_thread(fn)
            finally:
                await asyncio.gather(engine_busy, *flood)

    with pytest.raises(openai.InternalServerError) as info:
        asyncio.run(flood_then(lambda: run(0)))
    assert info.value.status_code == 503
    # The client honours Retry-After: with retries it is served once the queue has room.
    assert asyncio.run(flood_then(lambda: run(10))).usage.completion_tokens == 48


def _limit_open_files(soft: int, hard: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _open_files_limit(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_the_soft_open_file_limit_is_raised_to_the_hard_limit():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    with subprocess_server("--kv-cache-memory-gb", "0.05",
                           preexec_fn=_limit_open_files(256, hard)) as (_, proc, _log):
        assert _open_files_limit(proc.pid) == (hard, hard)


def _get_health(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock.recv(1024)


def test_out_of_file_descriptors_it_serves_open_connections_logs_once_and_recovers():
    limit = 64
    with subprocess_server("--kv-cache-memory-gb", "0.05", "--timeout-keep-alive", "60",
                           preexec_fn=_limit_open_files(limit, limit)) as (url, proc, log_path):
        port = int(url.rsplit(":", 1)[1])
        kept = socket.create_connection(("127.0.0.1", port))
        assert _get_health(kept).startswith(b"HTTP/1.1 200")
        extra = []
        for _ in range(limit + 16):
            extra.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(2.5)  # the descriptor watch looks every second
        assert _get_health(kept).startswith(b"HTTP/1.1 200")  # what was open is still served
        for sock in extra:
            sock.close()
        time.sleep(2.5)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as fresh:
            assert _get_health(fresh).startswith(b"HTTP/1.1 200")
        kept.close()
        with open(log_path) as f:
            log = f.read()
    assert log.count("out of file descriptors") == 1, log
    assert log.count("file descriptors are available again") == 1, log
