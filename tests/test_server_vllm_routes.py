"""vLLM's other routes and headers: /version, /ping and /invocations (SageMaker's), /load
(--enable-server-load-tracking), /tokenizer_info (--enable-tokenizer-info-endpoint) and
X-Request-Id (--enable-request-id-headers), against real servers."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import orjson
import pytest

import aserve
from server_fixtures import ServerThread

ALL_ON = {"enable_server_load_tracking": True, "enable_tokenizer_info_endpoint": True,
          "enable_request_id_headers": True}


@pytest.fixture(scope="module")
def server():
    """A server with every optional route and header of vLLM turned on."""
    with ServerThread(state_options=ALL_ON) as s:
        yield s


@pytest.fixture(scope="module")
def plain_server():
    """The defaults: the optional parts off, as in vLLM."""
    with ServerThread() as s:
        yield s


async def call(url: str, method: str = "GET", body=None, headers=None, raw: bytes = None):
    async with aiohttp.ClientSession() as session:
        kwargs = {"json": body} if raw is None else {"data": raw}
        async with session.request(method, url, headers=headers, **kwargs) as resp:
            return resp.status, resp.headers, await resp.read()


async def test_version_reports_aserves_version(plain_server):
    status, _, raw = await call(plain_server.url + "/version")
    assert status == 200 and orjson.loads(raw) == {"version": aserve.__version__}


async def test_ping_answers_as_health_to_get_and_post(plain_server):
    for method in ("GET", "POST"):
        status, _, _ = await call(plain_server.url + "/ping", method)
        assert status == 200, method


async def test_invocations_with_messages_is_a_chat_completion(plain_server):
    status, _, raw = await call(plain_server.url + "/invocations", "POST", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    body = orjson.loads(raw)
    assert status == 200 and body["object"] == "chat.completion", body
    assert body["choices"][0]["message"]["role"] == "assistant"


async def test_invocations_with_prompt_is_a_completion_and_streams(plain_server):
    status, _, raw = await call(plain_server.url + "/invocations", "POST", {"prompt": "Hello", "max_tokens": 3})
    body = orjson.loads(raw)
    assert status == 200 and body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 3
    status, headers, raw = await call(plain_server.url + "/invocations", "POST",
                                      {"prompt": "Hello", "max_tokens": 3, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_invocations_refuses_a_body_of_neither_shape(plain_server):
    for raw in (orjson.dumps({"input": "x"}), orjson.dumps([1, 2]), b"{not json"):
        status, _, answer = await call(plain_server.url + "/invocations", "POST", raw=raw)
        error = orjson.loads(answer)["error"]
        assert status == 400 and error["type"] == "invalid_request_error" and error["message"], raw


async def test_invocations_validates_like_the_route_it_picks(plain_server):
    status, _, raw = await call(plain_server.url + "/invocations", "POST", {"prompt": "x", "max_tokens": -1})
    assert status == 400 and orjson.loads(raw)["error"]["param"] == "max_tokens"


async def test_load_counts_requests_in_flight_when_tracking_is_on(server):
    async def long_stream(session):
        async with session.post(server.url + "/v1/completions", json={
                "prompt": "Long", "max_tokens": 400, "ignore_eos": True, "stream": True}) as resp:
            await resp.content.readline()   # it is running now
            started.set()
            await resp.read()

    async with aiohttp.ClientSession() as session:
        started = asyncio.Event()
        task = asyncio.ensure_future(long_stream(session))
        await asyncio.wait_for(started.wait(), 60)
        _, _, raw = await call(server.url + "/load")
        during = orjson.loads(raw)["server_load"]
        await task
    _, _, raw = await call(server.url + "/load")
    assert (during, orjson.loads(raw)["server_load"]) == (1, 0)


async def test_load_is_zero_without_tracking(plain_server):
    # vLLM serves /load always; without the flag nothing is counted.
    async with aiohttp.ClientSession() as session:
        async with session.post(plain_server.url + "/v1/completions", json={
                "prompt": "Long", "max_tokens": 200, "ignore_eos": True, "stream": True}) as resp:
            await resp.content.readline()
            _, _, raw = await call(plain_server.url + "/load")
            await resp.read()
    assert orjson.loads(raw) == {"server_load": 0}


async def test_tokenizer_info_is_served_only_when_enabled(server, plain_server):
    status, _, _ = await call(plain_server.url + "/tokenizer_info")
    assert status == 404
    status, _, raw = await call(server.url + "/tokenizer_info")
    info = orjson.loads(raw)
    tokenizer = server.async_engine.engine.tokenizer
    assert status == 200 and info["tokenizer_class"] == type(tokenizer).__name__
    assert info["chat_template"] == tokenizer.chat_template
    assert info.get("eos_token") == tokenizer.eos_token and "vocab_file" not in info


def test_request_id_header_echoes_the_clients_with_the_openai_client(server):
    client = server.openai_client()
    raw = client.completions.with_raw_response.create(
        model=server.model_name, prompt="Hi", max_tokens=2, extra_headers={"X-Request-Id": "my-id-42"})
    assert raw.headers["X-Request-Id"] == "my-id-42"
    with client.chat.completions.with_streaming_response.create(
            model=server.model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
            stream=True) as stream:
        assert re.fullmatch(r"[0-9a-f]{32}", stream.headers["X-Request-Id"])   # made up: one is sent


async def test_request_id_header_is_on_every_response(server, plain_server):
    for method, path, body in (("GET", "/health", None), ("GET", "/nope", None),
                               ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0}),
                               ("POST", "/generate", {"prompt": "x", "max_tokens": 2, "stream": True})):
        status, headers, _ = await call(server.url + path, method, body, headers={"X-Request-Id": "abc"})
        assert headers.get("X-Request-Id") == "abc", (path, status)
        status, headers, _ = await call(plain_server.url + path, method, body)
        assert "X-Request-Id" not in headers, path   # off by default, as in vLLM
