"""Bad input and faults: each gets OpenAI's error body, and the server goes on serving everyone."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from aserve.server.http_server import HttpLimits
from server_fixtures import ServerThread

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server():
    with ServerThread(limits=HttpLimits(max_body_bytes=MAX_BODY)) as s:
        yield s


async def post(server, path: str, body, raw: bool = False):
    data = body if raw else orjson.dumps(body)
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + path, data=data,
                                headers={"Content-Type": "application/json"}) as resp:
            return resp.status, orjson.loads(await resp.read())


def assert_openai_error(body: dict) -> dict:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


async def assert_still_serving(server):
    status, body = await post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("body, param", [
    (b'{"prompt": "Hello", "max_tokens": ', None),          # invalid JSON
    ({"max_tokens": 5}, "prompt"),                           # missing prompt
    ({"prompt": "Hello", "max_tokens": "5"}, "max_tokens"),  # wrong type
    ({"prompt": 42}, "prompt"),                              # wrong type
    ({"prompt": "Hello", "temperature": -0.5}, "temperature"),  # out of range
    ({"prompt": "Hello", "top_p": 0}, "top_p"),
    ({"prompt": "Hello", "n": 0}, "n"),
    ({"prompt": "Hello", "n": 2, "temperature": 0}, "n"),     # greedy makes one sequence
    ({"prompt": "Hello", "suffix": "!"}, "suffix"),          # refused, not ignored
    ({"prompt": [1, 2, 10**9]}, "prompt"),                   # a token id outside the vocabulary
    ({"prompt": []}, "prompt"),
])
async def test_bad_completion_input_is_a_400(server, body, param):
    status, resp = await post(server, "/v1/completions", body, raw=isinstance(body, bytes))
    assert status == 400
    assert assert_openai_error(resp)["param"] == param
    await assert_still_serving(server)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "h", "skip_special_tokens": 1}, "skip_special_tokens"),   # was a 500
    ({"prompt": "h", "ignore_eos": "false"}, "ignore_eos"),                # was taken as true
    ({"prompt": "h", "use_beam_search": "false"}, "use_beam_search"),
    ({"prompt": "h", "temperature": 1e308}, "temperature"),                # accepted before
    ({"prompt": "h", "repetition_penalty": 1e308}, "repetition_penalty"),
    ({"prompt": "h", "logit_bias": {"99999": 1.0}}, "logit_bias"),        # silently ignored before
    ({"prompt": "h", "stop_token_ids": [2**64 - 1]}, "stop_token_ids"),
    ({"prompt": "h", "stop": ["x"] * 1000}, "stop"),
])
async def test_bad_generate_input_is_a_400_naming_the_field(server, body, param):
    status, resp = await post(server, "/generate", body)
    assert status == 400, resp
    assert assert_openai_error(resp)["param"] == param
    await assert_still_serving(server)


@pytest.mark.parametrize("path, body", [
    ("/generate", {"prompt": "h"}),
    ("/v1/completions", {"prompt": "h"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "h"}]}),
])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("length_penalty", [1e308, -1e308])
async def test_beam_search_with_an_extreme_length_penalty_answers(server, path, body, stream, length_penalty):
    # gen_len ** length_penalty overflowed: a 500, or a stream's error event after its 200.
    body = dict(body, use_beam_search=True, best_of=2, n=2, length_penalty=length_penalty,
                max_tokens=12, stream=stream)
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + path, json=body) as resp:
            raw = await resp.read()
    assert resp.status == 200, raw
    assert b"error" not in raw


async def test_unknown_model_is_a_404(server):
    status, resp = await post(server, "/v1/completions", {"model": "gpt-5", "prompt": "Hello"})
    assert status == 404
    assert assert_openai_error(resp)["code"] == "model_not_found"


async def test_prompt_plus_max_tokens_over_the_context_names_both_numbers(server):
    prompt = "hello " * 300
    _, tokenized = await post(server, "/tokenize", {"prompt": prompt})
    n_prompt = tokenized["count"]
    status, resp = await post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 2000})
    assert status == 400
    message = assert_openai_error(resp)["message"]
    assert "maximum context length is 2048 tokens" in message
    assert str(n_prompt + 2000) in message and str(n_prompt) in message
    await assert_still_serving(server)


async def test_a_prompt_longer_than_the_context_is_a_400(server):
    status, resp = await post(server, "/v1/completions", {"prompt": [5] * 2100, "max_tokens": 1})
    assert status == 400
    assert "2048" in assert_openai_error(resp)["message"]


async def test_a_body_over_the_limit_is_a_413(server):
    status, resp = await post(server, "/v1/completions", {"prompt": "x" * (MAX_BODY + 10)})
    assert status == 413
    assert_openai_error(resp)
    await assert_still_serving(server)


async def test_an_unknown_route_is_a_404_in_openai_shape(server):
    status, resp = await post(server, "/v1/edits", {"prompt": "x"})
    assert status == 404
    assert_openai_error(resp)


async def test_bad_chat_input_is_a_400(server):
    status, resp = await post(server, "/v1/chat/completions", {"messages": "hi"})
    assert status == 400 and assert_openai_error(resp)["param"] == "messages"
    status, resp = await post(server, "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    assert status == 400 and assert_openai_error(resp)["param"] == "top_logprobs"


async def test_chat_without_a_template_is_a_clear_400(server):
    tokenizer = server.async_engine.engine.tokenizer
    saved = tokenizer.chat_template
    server.call(lambda: setattr(tokenizer, "chat_template", None))
    try:
        status, resp = await post(server, "/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "hi"}]})
    finally:
        server.call(lambda: setattr(tokenizer, "chat_template", saved))
    assert status == 400
    assert "--chat-template" in assert_openai_error(resp)["message"]


async def test_an_exception_in_one_request_fails_only_that_request(server):
    outputs = server.async_engine.engine.outputs
    original = outputs.append_token

    def poisoned(request, *args, **kwargs):
        if request.prompt and "POISON" in request.prompt:
            raise RuntimeError("injected fault")
        return original(request, *args, **kwargs)

    server.call(lambda: setattr(outputs, "append_token", poisoned))
    try:
        good = {"prompt": "Hello", "max_tokens": 20, "ignore_eos": True}
        (bad_status, bad), (good_status, ok), (stream_status, streamed) = await asyncio.gather(
            post(server, "/v1/completions", {"prompt": "POISON", "max_tokens": 20}),
            post(server, "/v1/completions", good),
            _stream_text(server, {"prompt": "POISON pill", "max_tokens": 20, "stream": True}))
    finally:
        server.call(lambda: setattr(outputs, "append_token", original))
    assert bad_status == 500 and "injected fault" in assert_openai_error(bad)["message"]
    assert good_status == 200 and ok["usage"]["completion_tokens"] == 20
    assert stream_status == 200 and b"injected fault" in streamed and streamed.endswith(b"data: [DONE]\n\n")
    assert b"Internal server error" in streamed   # vLLM's words, which its tests look for
    await assert_still_serving(server)


@pytest.mark.parametrize("pipelined", [True, False])
async def test_a_sampling_fault_of_one_request_fails_that_request_only(server, monkeypatch, pipelined):
    # A logits processor that breaks on one request's parameters (seed 4242). Plain sampled
    # requests run pipelined (async scheduling); logprobs make steps synchronous.
    from aserve.worker import sampler

    original = sampler.apply_logits_processors

    def poisoned(logits, metadata):
        if any(p.seed == 4242 for p in metadata.params):
            raise RuntimeError("injected sampler fault")
        return original(logits, metadata)

    monkeypatch.setattr(sampler, "apply_logits_processors", poisoned)
    extra = {} if pipelined else {"logprobs": 1}
    healthy = [{"prompt": f"Hello {i}", "max_tokens": 24, "ignore_eos": True, "seed": i, **extra}
               for i in range(8)]
    bad = {"prompt": "Hello", "max_tokens": 24, "ignore_eos": True, "seed": 4242, **extra}
    results = await asyncio.gather(*(post(server, "/v1/completions", body) for body in [bad] + healthy),
                                   _stream_text(server, dict(bad, stream=True)))
    (bad_status, bad_body), *ok, (stream_status, streamed) = results
    assert bad_status == 500 and "injected sampler fault" in assert_openai_error(bad_body)["message"]
    assert stream_status == 200 and b"injected sampler fault" in streamed and streamed.endswith(b"data: [DONE]\n\n")
    assert [status for status, _ in ok] == [200] * 8
    assert all(body["usage"]["completion_tokens"] == 24 for _, body in ok)
    monkeypatch.undo()
    await assert_still_serving(server)


async def test_a_failing_forward_fails_its_requests_and_the_server_carries_on(server):
    runner = server.async_engine.engine.runner
    original = runner._forward   # run by synchronous and pipelined (async-scheduling) steps alike
    calls = []

    def broken_once(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise RuntimeError("injected forward failure")
        return original(*args, **kwargs)

    server.call(lambda: setattr(runner, "_forward", broken_once))
    try:
        status, resp = await post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 4})
    finally:
        server.call(lambda: setattr(runner, "_forward", original))
    assert status == 500 and "injected forward failure" in assert_openai_error(resp)["message"]
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/health") as health:
            assert health.status == 200
    await assert_still_serving(server)


async def _stream_text(server, body) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/v1/completions", json=body) as resp:
            return resp.status, await resp.read()


async def test_health_is_503_once_the_engine_has_died():
    with ServerThread() as dying:
        engine = dying.async_engine.engine

        def broken_schedule():
            raise RuntimeError("injected engine death")

        dying.call(lambda: setattr(engine, "schedule", broken_schedule))
        async with aiohttp.ClientSession() as session:
            async with session.post(dying.url + "/v1/completions", json={"prompt": "Hi"}) as resp:
                assert resp.status in (500, 503)
                assert_openai_error(await resp.json())
            async with session.get(dying.url + "/health") as resp:
                assert resp.status == 503
            async with session.post(dying.url + "/v1/completions", json={"prompt": "Hi"}) as resp:
                assert resp.status == 503
                assert assert_openai_error(await resp.json())["code"] == "engine_dead"


async def test_one_refused_prompt_of_several_is_a_400_and_the_others_are_aborted(server):
    """The prompts of one request are submitted together (server/engine_requests.py): when the
    engine refuses one (its prompt and max_tokens pass the context), the request is a 400 and
    the prompts it took are aborted, their blocks freed."""
    short, long = [5] * 10, [6] * 1000
    aborted = server.async_engine.num_aborted
    status, resp = await post(server, "/v1/completions", {"prompt": [short, long, short], "max_tokens": 1500,
                                                          "ignore_eos": True})
    assert status == 400
    assert "maximum context length is 2048 tokens" in assert_openai_error(resp)["message"]
    assert server.async_engine.num_aborted == aborted + 2   # both short ones, before they finish
    stats = server.wait_until(lambda s: s.num_running == 0 and s.num_waiting == 0 and s.num_used_blocks == 0)
    assert stats.num_used_blocks == 0 and server.async_engine.num_open_streams == 0
    await assert_still_serving(server)


async def test_a_request_id_in_use_is_a_400_and_leaves_the_first_request_alone(server):
    """vLLM's request_id names the engine's requests: a second request under an id that is
    still running is refused before the engine (EngineDriver.submit), the first carries on."""
    first = asyncio.ensure_future(post(server, "/v1/completions", {
        "prompt": [[5] * 8, [6] * 8], "max_tokens": 300, "ignore_eos": True, "request_id": "twice"}))
    for _ in range(500):   # until the engine runs both (this loop must stay free: no wait_until)
        if server.stats().num_running == 2:
            break
        await asyncio.sleep(0.02)
    assert not first.done()
    status, resp = await post(server, "/v1/completions", {"prompt": [[7] * 8, [8] * 8], "max_tokens": 4,
                                                          "request_id": "twice"})
    assert status == 400
    assert "already in use" in assert_openai_error(resp)["message"]
    status, body = await first
    assert status == 200 and [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    await assert_still_serving(server)
