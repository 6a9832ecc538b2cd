"""POST /v1/chat/completions/batch (vLLM's): several conversations in one request, one choice
each, every one the same answer the conversation gets alone from /v1/chat/completions."""

from __future__ import annotations

import json

import aiohttp
import orjson
import pytest

from server_fixtures import ServerThread

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
          "required": ["answer"]}
CONVERSATIONS = [[{"role": "user", "content": "Reply with exactly the word: alpha"}],
                 [{"role": "user", "content": "Reply with exactly the word: beta"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]]


@pytest.fixture(scope="module")
def server():
    with ServerThread() as s:
        yield s


async def post(server, path: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + path, json=body) as resp:
            return resp.status, orjson.loads(await resp.read())


async def test_each_conversation_gets_the_choice_it_gets_alone(server):
    status, body = await post(server, "/v1/chat/completions/batch", {
        "model": server.model_name, "messages": CONVERSATIONS, "max_tokens": 6, "temperature": 0,
        "logprobs": True, "top_logprobs": 2, "return_token_ids": True})
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    prompt_tokens = 0
    for conversation, choice in zip(CONVERSATIONS, body["choices"]):
        status, alone = await post(server, "/v1/chat/completions", {
            "model": server.model_name, "messages": conversation, "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 2, "return_token_ids": True})
        assert status == 200, alone
        assert choice["message"] == alone["choices"][0]["message"]
        assert choice["token_ids"] == alone["choices"][0]["token_ids"]
        assert [t["token"] for t in choice["logprobs"]["content"]] == \
            [t["token"] for t in alone["choices"][0]["logprobs"]["content"]]
        assert choice["finish_reason"] == alone["choices"][0]["finish_reason"]
        prompt_tokens += alone["usage"]["prompt_tokens"]
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in body["choices"])


@pytest.mark.parametrize("constraint", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}},
    {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}])
async def test_a_json_schema_constrains_every_conversation(server, constraint):
    status, body = await post(server, "/v1/chat/completions/batch", {
        "model": server.model_name, "messages": CONVERSATIONS[:2], "max_tokens": 40, "temperature": 0,
        **constraint})
    assert status == 200, body
    assert len(body["choices"]) == 2
    for choice in body["choices"]:
        text = choice["message"]["content"]
        if "structured_outputs" in constraint:   # no whitespace to wander in: it ends
            assert choice["finish_reason"] == "stop", choice
            assert json.loads(text)["answer"] in ("yes", "no")
        else:   # a random model may spend its tokens on the whitespace JSON allows
            assert text.lstrip().startswith("{") and set(text) <= set('{}":, \t\nanswersyno')


@pytest.mark.parametrize("extra, param", [
    ({"stream": True}, "stream"), ({"n": 2}, "n"), ({"use_beam_search": True}, "use_beam_search"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "user", "content": "flat"}]}, "messages"),
])
async def test_what_the_batch_route_cannot_serve_is_a_400_naming_the_field(server, extra, param):
    status, body = await post(server, "/v1/chat/completions/batch", {
        "model": server.model_name, "messages": CONVERSATIONS, "max_tokens": 2, **extra})
    assert status == 400, body
    assert body["error"]["param"] == param
    status, _ = await post(server, "/v1/chat/completions/batch",
                           {"model": server.model_name, "messages": CONVERSATIONS[:1], "max_tokens": 2})
    assert status == 200
    assert server.stats().num_running == 0 and server.stats().num_waiting == 0
