"""A server started with --skip-tokenizer-init serves token-id prompts and refuses what needs
text with a 400 naming the field, instead of failing inside a handler."""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from server_fixtures import ServerThread, small_engine_args


@pytest.fixture(scope="module")
def server():
    with ServerThread(small_engine_args(skip_tokenizer_init=True)) as s:
        yield s


async def post(server, path, body):
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + path, json=body) as resp:
            return resp.status, orjson.loads(await resp.read())


async def test_token_id_prompts_complete_with_ids_and_no_text(server):
    status, body = await post(server, "/v1/completions", {
        "model": server.model_name, "prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True,
        "logprobs": 1, "echo": True})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["text"] == "" and body["usage"]["completion_tokens"] == 4


async def test_generate_with_token_ids_works(server):
    status, body = await post(server, "/generate", {"prompt": [5, 6, 7], "max_tokens": 3})
    assert status == 200, body


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": "Hello"}, "prompt"),     # max_tokens from the prompt's length
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, "messages"),
    ("/tokenize", {"prompt": "Hello"}, "prompt"),
    ("/detokenize", {"tokens": [5, 6]}, "tokens"),
    ("/v1/completions", {"prompt": [5, 6], "guided_choice": ["a"]}, "guided_choice"),   # grammars need one
])
async def test_text_needs_a_tokenizer_and_gets_a_400(server, path, body, param):
    status, reply = await post(server, path, {"model": server.model_name, **body})
    assert status == 400, reply
    assert reply["error"]["param"] == param and "tokenizer" in reply["error"]["message"]


async def test_generate_with_text_prompt_is_a_400(server):
    status, reply = await post(server, "/generate", {"prompt": "Hello", "max_tokens": 3})
    assert status == 400 and "token ids" in reply["error"]["message"]
