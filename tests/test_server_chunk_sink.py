"""The chunk sink (server/chunk_sink.py): a plain streamed choice's chunks written from the
engine's dispatch. Its bytes are the handler's, byte for byte; it leaves to the handler what
needs waiting (a full transport buffer), a closed connection and the final output; and a real
server's streams go through it and come out the same as the handler's."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request

import orjson
import pytest

from aserve.engine.request_stream import RequestStream
from aserve.outputs import CompletionOutput, RequestOutput
from aserve.server.chunk_sink import TEXT_MARK, WRITE_BUFFER_LIMIT, ChoiceProgress, TextChunkSink
from aserve.server.stream_chunks import chat_content_chunk, completion_text_chunk
from server_fixtures import ServerThread

TEXTS = ["Hello", "", " wörld", "\ufffd", 'quote " and \\ backslash', "line\nbreak\ttab", "😀", "\x00"]


def _output(text: str, num_tokens: int, finished: bool = False) -> RequestOutput:
    choice = CompletionOutput(index=0, text=text, token_ids=list(range(num_tokens)), cumulative_logprob=None,
                              logprobs=None, finish_reason="length" if finished else None)
    return RequestOutput(request_id="r", prompt=None, prompt_token_ids=[1], prompt_logprobs=None,
                         outputs=[choice], finished=finished)


async def _connected_transport():
    """A real asyncio transport on one end of a socket pair, and the other end to read from."""
    ours, theirs = socket.socketpair()
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, ours)
    theirs.setblocking(False)
    return transport, theirs


async def _read_all(sock: socket.socket) -> bytes:
    await asyncio.sleep(0.05)
    data = b""
    while True:
        try:
            part = sock.recv(1 << 20)
        except BlockingIOError:
            return data
        if not part:
            return data
        data += part


def _unchunk(data: bytes) -> list[bytes]:
    """The payloads of HTTP/1.1 chunked framing (no terminating chunk here)."""
    payloads = []
    while data:
        size_line, data = data.split(b"\r\n", 1)
        size = int(size_line, 16)
        payloads.append(data[:size])
        assert data[size:size + 2] == b"\r\n"
        data = data[size + 2:]
    return payloads


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("kind", ["completion", "chat"])
async def test_the_sinks_chunks_are_the_handlers_bytes(kind, chunked):
    transport, reader = await _connected_transport()
    if kind == "completion":
        def body(text):
            return completion_text_chunk("cmpl-7", 123, "my model", 0, text, None, None)
    else:
        def body(text):
            return chat_content_chunk("chatcmpl-7", 123, "my model", 0, text, None, None)
    progress = ChoiceProgress()
    sink = TextChunkSink(transport, chunked, progress, body(TEXT_MARK))
    text = ""
    for num_tokens, piece in enumerate(TEXTS, start=1):
        text += piece
        assert sink(_output(text, num_tokens))
    assert (progress.text_len, progress.num_tokens) == (len(text), len(TEXTS))
    data = await _read_all(reader)
    expected = [b"data: " + orjson.dumps(body(piece)) + b"\n\n" for piece in TEXTS]
    assert (_unchunk(data) if chunked else data) == (expected if chunked else b"".join(expected))
    transport.close()
    reader.close()


async def test_the_sink_leaves_to_the_handler_what_it_must_not_write():
    transport, reader = await _connected_transport()
    progress = ChoiceProgress()
    sink = TextChunkSink(transport, True, progress, completion_text_chunk("c", 1, "m", 0, TEXT_MARK, None, None))
    assert sink(_output("a", 1))
    # An output with no token beyond what was sent is taken, and writes nothing.
    assert sink(_output("a", 1))
    assert len(_unchunk(await _read_all(reader))) == 1
    # The final output: the handler sends it, with its finish reason.
    assert not sink(_output("ab", 2, finished=True))
    assert progress.num_tokens == 1
    # A transport whose buffer is over the limit: the handler writes, and waits for the drain.
    transport.pause_reading()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    filled = 0
    while transport.get_write_buffer_size() <= WRITE_BUFFER_LIMIT and filled < 10_000:
        transport.write(b"x" * 65536)   # the reader reads nothing: the buffer fills
        filled += 1
    assert transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT
    assert not sink(_output("ab", 2))
    transport.abort()
    reader.close()
    await asyncio.sleep(0)
    # A closed connection: the handler's write raises the ConnectionError that ends the request.
    assert not sink(_output("ab", 2))
    assert progress.num_tokens == 1


def test_a_body_whose_names_hold_the_mark_is_refused():
    with pytest.raises(ValueError, match="exactly once"):
        TextChunkSink(None, True, ChoiceProgress(),
                      completion_text_chunk(TEXT_MARK, 1, "m", 0, TEXT_MARK, None, None))


@pytest.fixture(scope="module")
def server():
    with ServerThread() as s:
        yield s


@pytest.fixture()
def sink_calls(monkeypatch):
    """What each stream's sink did: a list of booleans (took the output or not) per sink."""
    calls: list[list[bool]] = []
    set_sink = RequestStream.set_sink

    def recording_set_sink(self, sink):
        taken: list[bool] = []
        calls.append(taken)

        def recorded(output):
            result = sink(output)
            taken.append(result)
            return result
        set_sink(self, recorded)

    monkeypatch.setattr(RequestStream, "set_sink", recording_set_sink)
    return calls


def _events(server, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        lines = [line[len("data: "):] for line in resp.read().decode().split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_servers_plain_stream_goes_through_the_sink_and_matches_the_handlers(server, sink_calls, path):
    # Enough tokens that the loop takes an output before the request ends (see the HTTP/1.0 test).
    body = {"model": server.model_name, "max_tokens": 120, "stream": True, "temperature": 0, "ignore_eos": True}
    if path == "/v1/completions":
        body["prompt"] = "The sink and the handler"
    else:
        body["messages"] = [{"role": "user", "content": "The sink and the handler"}]
    plain = _events(server, path, body)
    assert len(sink_calls) == 1 and sum(sink_calls[0]) > 0, "the plain stream's chunks went through its sink"
    # With continuous usage every chunk carries usage: the handler builds them all.
    usage = _events(server, path, dict(body, stream_options={"include_usage": True,
                                                             "continuous_usage_stats": True}))
    assert len(sink_calls) == 1, "no sink for a stream whose chunks carry usage"

    def texts(events):  # (the text, the finish reasons): how the chunks fall depends on timing
        choices = [e["choices"][0] for e in events if e["choices"]]
        pieces = [c["text"] if "text" in c else c["delta"].get("content", "") for c in choices]
        return "".join(pieces), [c["finish_reason"] for c in choices]

    (text, reasons), (usage_text, usage_reasons) = texts(plain), texts(usage)
    assert text == usage_text and reasons[-1] == usage_reasons[-1] == "length" and not any(reasons[:-1])
    assert all(e["usage"] is None for e in plain)


def test_an_http10_client_gets_the_sinks_chunks_unframed(server, sink_calls):
    """HTTP/1.0 has no chunked encoding: the body is the events themselves, ended by the close.
    120 tokens: the engine never waits for the loop, so at 20 it once finished the request
    before the loop took an output, and the handler alone wrote the stream (CI, 038b820)."""
    body = json.dumps({"model": server.model_name, "prompt": "Old client", "max_tokens": 120, "stream": True,
                       "temperature": 0, "ignore_eos": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        data = b""
        while part := sock.recv(65536):
            data += part
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"transfer-encoding" not in head.lower()
    events = [e for e in payload.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert sum(len(c["choices"][0]["text"]) for c in chunks) > 0
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(sink_calls) == 1 and sum(sink_calls[0]) > 0
