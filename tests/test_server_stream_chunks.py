"""Streams send one chunk (on /v1/responses: one output_text.delta event) per step that brought
tokens, also when those tokens make no character yet (part of a UTF-8 sequence): empty text, as
vLLM streams, so a client that counts chunks as tokens (vLLM's benchmark does) counts right.
And the plain chunks, built without pydantic, are the same JSON as the response models give.

A chunk per step holds while the event loop takes each step's outputs before the next step
ends; a loop that falls behind (a saturated server) gets several steps' tokens in one chunk,
as vLLM's does. The tiny model's CPU steps are about as short as a round of the loop, so the
server here slows each step down to make the first case certain."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from aserve.server.api_chat import _chunk
from aserve.server.protocol_answers import (ChatStreamChoice, CompletionStreamChoice, CompletionStreamResponse,
                                            DeltaMessage)
from aserve.server.stream_chunks import chat_content_chunk, completion_text_chunk
from server_fixtures import ServerThread

MAX_TOKENS = 6


STEP_DELAY_S = 0.02


@pytest.fixture(scope="module")
def server():
    with ServerThread() as s:
        engine = s.async_engine.engine
        step_gen = engine.step_gen

        def slow_step_gen():  # in the engine thread, before each step
            time.sleep(STEP_DELAY_S)
            return (yield from step_gen())

        engine.step_gen = slow_step_gen
        yield s


def _lead_byte_token(server) -> int:
    """The byte-level token of 0xE2, the first byte of a three-byte character: alone it is no text."""
    tokenizer = server.async_engine.engine.tokenizer
    # GPT-2's byte-level alphabet writes bytes 0xAE-0xFF as the characters of the same code.
    token_id = tokenizer.convert_tokens_to_ids(chr(0xE2))
    assert token_id != tokenizer.unk_token_id and tokenizer.decode([token_id]) in ("", "\ufffd")
    return token_id


def _events(server, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 200
        lines = [line[len("data: "):] for line in resp.read().decode().split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_completion_stream_sends_a_chunk_per_token_even_without_text(server):
    body = {"model": server.model_name, "prompt": "Hello", "max_tokens": MAX_TOKENS, "stream": True,
            "temperature": 0, "ignore_eos": True, "logit_bias": {str(_lead_byte_token(server)): 100}}
    chunks = [e for e in _events(server, "/v1/completions", body) if e["choices"]]
    assert len(chunks) == MAX_TOKENS
    # The first lead byte is no character yet; each later one makes the one before it invalid
    # (U+FFFD, shown at once), and the last is flushed as one when the sequence ends.
    texts = [c["choices"][0]["text"] for c in chunks]
    assert texts[0] == "" and "".join(texts) == "\ufffd" * MAX_TOKENS
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_stream_sends_a_chunk_per_token_even_without_content(server):
    body = {"model": server.model_name, "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": MAX_TOKENS, "stream": True, "temperature": 0, "ignore_eos": True,
            "logit_bias": {str(_lead_byte_token(server)): 100}}
    chunks = [e for e in _events(server, "/v1/chat/completions", body) if e["choices"]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = chunks[1:]
    assert len(tokens) == MAX_TOKENS
    contents = [c["choices"][0]["delta"].get("content", "") for c in tokens]
    assert contents[0] == "" and "".join(contents) == "\ufffd" * MAX_TOKENS
    assert tokens[-1]["choices"][0]["finish_reason"] == "length"


def test_responses_stream_sends_a_delta_per_token_even_without_text(server):
    body = {"model": server.model_name, "input": "Hello", "max_output_tokens": MAX_TOKENS, "stream": True,
            "temperature": 0, "ignore_eos": True, "logit_bias": {str(_lead_byte_token(server)): 100}}
    request = urllib.request.Request(server.url + "/v1/responses", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        events = [json.loads(line[len("data: "):]) for line in resp.read().decode().split("\n")
                  if line.startswith("data: ")]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) == MAX_TOKENS
    assert deltas[0] == "" and "".join(deltas) == "\ufffd" * MAX_TOKENS
    assert events[-1]["type"] == "response.incomplete"


@pytest.mark.parametrize("finish_reason, stop_reason", [(None, None), ("stop", "END"), ("stop", 7)])
def test_plain_chunks_are_the_models_json(finish_reason, stop_reason):
    choice = CompletionStreamChoice(index=3, text="hé", finish_reason=finish_reason, stop_reason=stop_reason)
    model_body = CompletionStreamResponse(id="cmpl-1", created=5, model="m", choices=[choice]).model_dump()
    plain = completion_text_chunk("cmpl-1", 5, "m", 3, "hé", finish_reason, stop_reason)
    assert json.dumps(plain) == json.dumps(model_body)  # same keys in the same order
    for content in ("hé", "", None):
        model_body = _chunk("chatcmpl-1", 5, "m", ChatStreamChoice(
            index=1, delta=DeltaMessage(content=content), finish_reason=finish_reason,
            stop_reason=stop_reason))
        plain = chat_content_chunk("chatcmpl-1", 5, "m", 1, content, finish_reason, stop_reason)
        assert json.dumps(plain) == json.dumps(model_body)


def _http_chunks(server, path: str, body: dict) -> list[bytes]:
    """The response's chunks of the chunked transfer encoding, as the server framed them."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(server.url)
    payload = json.dumps(body).encode()
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"200 OK" in head.split(b"\r\n")[0] and b"transfer-encoding: chunked" in head.lower()
    chunks = []
    while True:
        size, _, rest = rest.partition(b"\r\n")
        size = int(size, 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        rest = rest[size + 2:]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Hello"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]}),
])
def test_the_final_chunk_the_usage_and_done_end_the_stream_in_one_write(server, path, body):
    """One write (one send on the socket) ends a stream: the final output's chunk, the usage
    and [DONE] share the body's last chunk, instead of a write each."""
    body = dict(body, model=server.model_name, max_tokens=MAX_TOKENS, ignore_eos=True, stream=True,
                stream_options={"include_usage": True})
    chunks = _http_chunks(server, path, body)
    last = [json.loads(e[len(b"data: "):]) for e in chunks[-1].split(b"\n\n")[:-2]]
    assert chunks[-1].endswith(b"data: [DONE]\n\n")
    assert [bool(e["choices"]) for e in last] == [True, False]      # the finish chunk, then the usage
    assert last[0]["choices"][0]["finish_reason"] == "length"
    assert last[1]["usage"]["completion_tokens"] == MAX_TOKENS
    assert not any(b"finish_reason\":\"length" in c for c in chunks[:-1])
