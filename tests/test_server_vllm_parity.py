"""vLLM's API at the door, on a real server: exact integers, content types, the empty prompt,
the model name, as vLLM answers them (issue 14)."""

from __future__ import annotations

import http.client
import json

import openai
import pytest

from server_fixtures import module_server_and_client

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


server, client = module_server_and_client()


def post_raw(server, path: str, data: bytes, content_type=None) -> tuple[int, dict]:
    """POST with exactly this Content-Type header, or none at all (http.client adds none;
    urllib would add a form type of its own)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": content_type} if content_type else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def post(server, path: str, body_text: str) -> tuple[int, dict]:
    return post_raw(server, path, body_text.encode(), "application/json")


# ----------------------------------------------------------------------------- seed and integers
@pytest.mark.parametrize("seed", [INT64_MIN, INT64_MAX])
def test_seed_accepts_the_whole_signed_64_bit_range(client, server, seed):
    resp = client.completions.create(model=server.model_name, prompt="Hi", max_tokens=2, seed=seed)
    assert resp.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("seed", [INT64_MIN - 1, INT64_MAX + 1, 10 ** 30])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_seed_outside_int64_is_a_400_naming_the_bound_and_the_exact_value(server, seed, route):
    # Written by hand: the integer must reach the server as the literal digits.
    prompt = '"prompt": "Hi"' if route == "/v1/completions" else '"messages": [{"role": "user", "content": "Hi"}]'
    status, body = post(server, route, f'{{{prompt}, "max_tokens": 2, "seed": {seed}}}')
    assert status == 400, body
    error = body["error"]
    assert error["param"] == "seed"
    assert str(seed) in error["message"] and "64-bit" in error["message"], error["message"]
    assert str(INT64_MAX) in error["message"]
    # vLLM's message names the broken bound as pydantic does; its tests match either word.
    assert ("greater_than_equal" if seed < 0 else "less_than_equal") in error["message"]


@pytest.mark.parametrize("field", ["max_tokens", "n", "logprobs", "min_tokens"])
def test_huge_integers_stay_integers_in_every_field(server, field):
    status, body = post(server, "/v1/completions", f'{{"prompt": "Hi", "{field}": {10 ** 25}}}')
    assert status == 400, body
    message = body["error"]["message"]
    assert str(10 ** 25) in message and "e+25" not in message, message


def test_a_float_is_still_refused_where_an_integer_belongs(server):
    status, body = post(server, "/v1/completions", '{"prompt": "Hi", "seed": 1.5e30}')
    assert status == 400 and body["error"]["param"] == "seed", body


def test_a_prompt_with_long_digit_runs_is_served(client, server):
    resp = client.completions.create(model=server.model_name, prompt="call 12345678901234567890123",
                                     max_tokens=2)
    assert resp.choices[0].text is not None


# ----------------------------------------------------------------------------- content type
def test_a_form_content_type_is_refused_with_a_400(server):
    status, body = post_raw(server, "/v1/completions", b'{"prompt": "Hi", "max_tokens": 2}',
                            "application/x-www-form-urlencoded")
    assert status == 400, body
    assert "application/json" in body["error"]["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "multipart/form-data; boundary=x"])
def test_other_non_json_content_types_are_refused_on_every_json_route(server, content_type):
    for path, body in [("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}]}'),
                       ("/tokenize", b'{"prompt": "Hi"}'), ("/generate", b'{"prompt": "Hi"}')]:
        status, answer = post_raw(server, path, body, content_type)
        assert status == 400, (path, answer)


def test_json_with_a_charset_and_a_missing_content_type_are_accepted(server):
    body = b'{"prompt": "Hi", "max_tokens": 2}'
    assert post_raw(server, "/v1/completions", body, "application/json; charset=utf-8")[0] == 200
    assert post_raw(server, "/v1/completions", body, None)[0] == 200


# ----------------------------------------------------------------------------- prompt and model
@pytest.mark.parametrize("prompt, extra", [("", {}), ([], {}), (None, {}), (None, {"prompt_embeds": []})])
def test_an_empty_prompt_says_what_vllm_says(client, server, prompt, extra):
    """Newer vLLM's server says the first, its engine (older servers) the second: clients'
    tests match either."""
    with pytest.raises(openai.BadRequestError, match="Either prompt or prompt_embeds must be provided and non-empty.") as info:
        client.completions.create(model=server.model_name, prompt=prompt, max_tokens=2, extra_body=extra)
    assert "decoder prompt cannot be empty" in info.value.body["message"]
    assert info.value.body["param"] == "prompt"


@pytest.mark.parametrize("prompt", [[-1], [[5, -1]], [10 ** 6]])
def test_an_id_outside_the_vocabulary_says_what_vllm_says(client, server, prompt):
    """vLLM refuses a negative id by its protocol's bound, a large one as out of vocabulary."""
    words = "greater than or equal to 0" if "-1" in str(prompt) else "out of vocabulary"
    with pytest.raises(openai.BadRequestError, match=words) as info:
        client.completions.create(model=server.model_name, prompt=prompt, max_tokens=2)
    assert "out of vocabulary" in info.value.body["message"] and info.value.body["param"] == "prompt"


@pytest.mark.parametrize("field", ["stop_token_ids", "logit_bias"])
def test_an_id_past_the_vocabulary_is_named_with_the_vocabulary_size(client, server, field):
    """As vLLM's tests read it: the refused id and the vocabulary's size, both in the message."""
    vocab = server.state.vocab_size
    extra = {"stop_token_ids": [vocab + 1]} if field == "stop_token_ids" else {"logit_bias": {str(vocab + 1): 1.0}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=2, extra_body=extra)
    assert str(vocab + 1) in str(info.value) and str(vocab) in str(info.value)
    ok = {"stop_token_ids": [vocab - 1]} if field == "stop_token_ids" else {"logit_bias": {str(vocab - 1): 1.0}}
    client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "x"}],
                                   max_tokens=2, extra_body=ok)


def test_every_logit_bias_key_that_is_no_token_id_is_named(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=2, logit_bias={"bad1": 50.0, "bad2": 20.0})
    assert "bad1" in str(info.value) and "bad2" in str(info.value) and "logit_bias" in str(info.value)


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_a_json_schema_format_without_its_schema_says_what_vllm_says(client, server, route):
    with pytest.raises(openai.BadRequestError, match="json_schema.*must be provided") as info:
        if route == "completions":
            client.completions.create(model=server.model_name, prompt="x", max_tokens=2,
                                      extra_body={"response_format": {"type": "json_schema"}})
        else:
            client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "x"}],
                                           max_tokens=2, response_format={"type": "json_schema"})
    assert info.value.body["param"] == "response_format"


@pytest.mark.parametrize("model", ["", None])
def test_an_empty_or_missing_model_means_the_served_model(server, model):
    body = {"prompt": "Hi", "max_tokens": 2}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    if model is not None:
        body["model"] = chat["model"] = model
    for path, payload in [("/v1/completions", body), ("/v1/chat/completions", chat)]:
        status, answer = post(server, path, json.dumps(payload))
        assert status == 200, answer
        assert answer["model"] == server.model_name


# ----------------------------------------------------------------------------- the parser itself
@pytest.mark.parametrize("raw", [
    b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",       # more digits than Python's int() takes
    b'{"prompt": "\\ud800", "seed": 12345678901234567890}',  # a lone surrogate, on the exact path
    b'{"prompt": "x", "seed": 12345678901234567890, "t": 1e400}',
    b'{"prompt": "x", "seed": 12345678901234567890, "t": NaN}',
])
def test_bodies_the_exact_path_sees_are_refused_as_orjson_refuses_them(raw):
    from aserve.server.errors import APIError, parse_request
    from aserve.server.protocol import CompletionRequest
    with pytest.raises(APIError) as info:
        parse_request(raw, CompletionRequest)
    assert info.value.status == 400 and "JSON" in info.value.message


def test_exact_parsing_keeps_floats_floats_and_ints_exact():
    from aserve.server.json_body import loads_exact
    data = loads_exact(b'{"a": 123456789012345678901234567890, "b": 1.5, "c": -9223372036854775809, "d": 1e30}')
    assert data == {"a": 123456789012345678901234567890, "b": 1.5, "c": -9223372036854775809, "d": 1e30}
    assert isinstance(data["d"], float) and isinstance(data["a"], int)


def test_non_streamed_answers_carry_vllms_null_fields(server):
    """vLLM writes OpenAI's unfilled fields as nulls (clients compare a raw answer's keys with
    their parsed model's, and read choice.token_ids without return_token_ids)."""
    status, chat = post(server, "/v1/chat/completions",
                        '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}')
    assert status == 200, chat
    assert {"service_tier", "system_fingerprint", "prompt_token_ids"} <= chat.keys()
    assert chat["system_fingerprint"] is None and chat["prompt_token_ids"] is None
    message = chat["choices"][0]["message"]
    assert all(message[k] is None for k in ("refusal", "annotations", "audio", "function_call"))
    assert chat["choices"][0]["token_ids"] is None and message["tool_calls"] == []
    status, completion = post(server, "/v1/completions", '{"prompt": "Hi", "max_tokens": 2}')
    assert status == 200, completion
    assert completion["system_fingerprint"] is None and completion["service_tier"] is None
    choice = completion["choices"][0]
    assert choice["token_ids"] is None and choice["prompt_token_ids"] is None


def test_usage_is_the_three_counts_unless_prompt_token_details_are_asked_for(client, server):
    """vLLM reports prompt_tokens_details only with --enable-prompt-tokens-details; its tests
    compare usage with CompletionUsage(completion_tokens, prompt_tokens, total_tokens)."""
    from openai.types import CompletionUsage

    resp = client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "Hi"}],
                                          max_completion_tokens=3)
    usage = resp.usage
    assert usage == CompletionUsage(completion_tokens=usage.completion_tokens, prompt_tokens=usage.prompt_tokens,
                                    total_tokens=usage.prompt_tokens + usage.completion_tokens)
    server.call(lambda: setattr(server.state, "enable_prompt_tokens_details", True))
    try:
        resp = client.completions.create(model=server.model_name, prompt="Hi", max_tokens=2)
        assert resp.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        server.call(lambda: setattr(server.state, "enable_prompt_tokens_details", False))


def test_forced_usage_puts_usage_on_every_chunk_of_every_stream(client, server):
    """--enable-force-include-usage: as vLLM's test reads a stream without stream_options,
    every chunk carries usage, completion tokens rising, and a usage chunk ends it."""
    server.call(lambda: setattr(server.state, "enable_force_include_usage", True))
    try:
        stream = client.chat.completions.create(
            model=server.model_name, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=10,
            temperature=0.0, stream=True, extra_body={"min_tokens": 10})
        chunks = list(stream)
        last = 0
        for chunk in chunks:
            usage = chunk.usage
            assert usage.prompt_tokens >= 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
            assert last == 0 or usage.completion_tokens > last or (not chunk.choices and usage.completion_tokens == last)
            last = usage.completion_tokens
        assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 10
        pieces = list(client.completions.create(model=server.model_name, prompt="Hi", max_tokens=4, stream=True))
        assert all(p.usage is not None for p in pieces) and pieces[-1].usage.completion_tokens == 4
    finally:
        server.call(lambda: setattr(server.state, "enable_force_include_usage", False))
    plain = list(client.completions.create(model=server.model_name, prompt="Hi", max_tokens=2, stream=True))
    assert all(p.usage is None for p in plain)
