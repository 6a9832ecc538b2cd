"""Fuzzing every route, hypothesis-driven: JSON bodies of every shape and value (plausible
ones, edge numbers, any JSON at all) and raw HTTP (methods, headers, encodings, lengths). No
answer may be a 5xx, every 4xx carries OpenAI's error body, a 2xx stream never ends in an error
event, and afterwards the engine still serves and holds no KV block.

CI runs a couple of minutes of it (a fixed, derandomized sequence); `--fuzz-long` (bench/) runs
many more, randomly seeded. The server's context is 64 tokens, so a valid request never costs
much however it was drawn (max_tokens may be absent, or null: up to the context)."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import zlib
from collections import Counter

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aserve.server.http_server import HttpLimits
from server_fixtures import ServerThread, small_engine_args

API_KEY = "fuzz-key"
COUNTS: Counter = Counter()


@pytest.fixture(scope="module")
def server():
    with ServerThread(small_engine_args(max_model_len=64), api_key=API_KEY,
                      limits=HttpLimits(max_body_bytes=256 * 1024, body_read_timeout_s=0.5)) as s:
        yield s
    print(f"\nfuzz: {COUNTS['sent']} requests sent, {COUNTS['2xx']} 2xx, {COUNTS['4xx']} 4xx, "
          f"{COUNTS['5xx']} 5xx, {COUNTS['closed']} closed without an answer (raw HTTP)")


def examples(fuzz_long: bool, ci: int, long: int) -> settings:
    return settings(max_examples=long if fuzz_long else ci, deadline=None, database=None,
                    derandomize=not fuzz_long,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- JSON bodies
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
ANY_JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)
EDGE_NUMBERS = st.sampled_from([0, -1, 1, 2, 255, 256, 1023, 1024, 2**31, 2**63 - 1, 2**63, 2**64 - 1,
                                -(2**63), 1e308, -1e308, 1e-308, 0.5, 1.0, 2.0, 2.0000001, 100.0,
                                100.5, 1e30, 709.8, [1024], [2**64 - 1], {"1024": 1.0}])


def fuzzed(plausible):
    """A field's values: mostly plausible, sometimes an edge number or any JSON at all."""
    return st.one_of(plausible, plausible, plausible, EDGE_NUMBERS, ANY_JSON)


TEXT = st.text(max_size=40)
TOKEN_IDS = st.lists(st.integers(0, 1023), max_size=12)  # the built-in model's vocabulary
SAMPLING = {
    "n": st.integers(1, 3), "best_of": st.integers(1, 4), "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1), "top_k": st.integers(-1, 60), "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 3), "seed": st.integers(0, 2**31),
    "stop": st.one_of(TEXT, st.lists(st.text(max_size=6), max_size=5)), "stop_token_ids": TOKEN_IDS,
    "ignore_eos": st.booleans(), "max_tokens": st.integers(1, 8), "min_tokens": st.integers(0, 4),
    "use_beam_search": st.sampled_from([False, False, False, True]), "length_penalty": st.floats(-2, 2),
    "early_stopping": st.sampled_from([True, False, "never"]), "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(), "spaces_between_special_tokens": st.booleans(),
    "logit_bias": st.dictionaries(st.integers(0, 1023).map(str), st.floats(-100, 100), max_size=3),
    "stream": st.booleans(),
}
MODEL = st.sampled_from(["aserve-tiny-random"] * 4 + ["gpt-4"])
STREAM_OPTIONS = st.fixed_dictionaries({"include_usage": st.booleans()})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                 "content": st.one_of(TEXT, st.lists(st.fixed_dictionaries(
                                     {"type": st.sampled_from(["text", "image_url"]), "text": TEXT}),
                                     max_size=2))})
# Each route's fields, with plausible values (fuzzed() adds the implausible ones).
ROUTES = {
    "/generate": dict(SAMPLING, prompt=st.one_of(TEXT, TOKEN_IDS), logprobs=st.integers(0, 5),
                      prompt_logprobs=st.integers(0, 5)),
    "/v1/completions": dict(SAMPLING, model=MODEL, prompt=st.one_of(
        TEXT, TOKEN_IDS, st.lists(TEXT, max_size=3), st.lists(TOKEN_IDS, max_size=3)),
        echo=st.booleans(), logprobs=st.integers(0, 5), suffix=TEXT, stream_options=STREAM_OPTIONS,
        user=TEXT),
    "/v1/chat/completions": dict(SAMPLING, model=MODEL, messages=st.lists(MESSAGE, max_size=3),
                                 logprobs=st.booleans(), top_logprobs=st.integers(0, 5),
                                 max_completion_tokens=st.integers(1, 8), add_generation_prompt=st.booleans(),
                                 response_format=st.fixed_dictionaries(
                                     {"type": st.sampled_from(["text", "json_object"])}),
                                 tools=st.lists(ANY_JSON, max_size=2), stream_options=STREAM_OPTIONS),
    "/tokenize": {"model": MODEL, "prompt": TEXT, "messages": st.lists(MESSAGE, max_size=2),
                  "add_special_tokens": st.booleans(), "add_generation_prompt": st.booleans()},
    "/detokenize": {"model": MODEL, "tokens": TOKEN_IDS},
    "/v1/responses": {
        "model": MODEL, "input": st.one_of(TEXT, st.lists(st.one_of(MESSAGE, ANY_JSON), max_size=3)),
        "instructions": TEXT, "max_output_tokens": st.integers(1, 8), "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1), "top_k": st.integers(-1, 60), "seed": st.integers(0, 2**31),
        "stop": SAMPLING["stop"], "ignore_eos": st.booleans(), "logit_bias": SAMPLING["logit_bias"],
        "stream": st.booleans(), "store": st.booleans(), "background": st.sampled_from([False, False, True]),
        "previous_response_id": st.just("resp_nope"), "top_logprobs": st.integers(0, 5),
        "include": st.lists(st.sampled_from(["message.output_text.logprobs", "nonsense"]), max_size=2),
        "text": st.fixed_dictionaries({"format": st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "json_object"])})}),
        "tools": st.lists(ANY_JSON, max_size=2), "tool_choice": st.sampled_from(["none", "auto", "required"]),
        "truncation": st.sampled_from(["auto", "disabled"]), "metadata": st.dictionaries(TEXT, TEXT, max_size=2)},
    "/v1/messages": {
        "model": MODEL, "messages": st.lists(MESSAGE, max_size=3), "max_tokens": st.integers(1, 8),
        "system": TEXT, "stop_sequences": st.lists(st.text(max_size=6), max_size=3), "stream": st.booleans(),
        "temperature": st.floats(0, 1), "top_p": st.floats(0, 1), "top_k": st.integers(0, 60),
        "tools": st.lists(ANY_JSON, max_size=2),
        "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "none"])})},
    # A generating server answers these 400 (they need --runner pooling): the shape still counts.
    "/v1/embeddings": {"model": MODEL, "input": st.one_of(TEXT, TOKEN_IDS, st.lists(TEXT, max_size=3)),
                       "encoding_format": st.sampled_from(["float", "base64"]), "dimensions": st.integers(-1, 80)},
    "/score": {"model": MODEL, "text_1": st.one_of(TEXT, st.lists(TEXT, max_size=2)),
               "text_2": st.one_of(TEXT, st.lists(TEXT, max_size=2))},
    "/rerank": {"model": MODEL, "query": TEXT, "documents": st.lists(TEXT, max_size=3), "top_n": st.integers(-1, 3)},
}

# vLLM's extra fields (protocol_vllm.py), with the values that are refused by name among them.
VLLM_EXTRAS = {
    "prompt_logprobs": st.integers(-1, 3), "allowed_token_ids": st.lists(st.integers(0, 1023), max_size=4),
    "bad_words": st.lists(st.text(max_size=8), max_size=3), "truncate_prompt_tokens": st.integers(-1, 80),
    "return_tokens_as_token_ids": st.booleans(), "request_id": TEXT, "priority": st.integers(0, 1),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                          "continuous_usage_stats": st.booleans()}),
}
ROUTES["/v1/completions"].update(VLLM_EXTRAS, add_special_tokens=st.booleans())
ROUTES["/v1/chat/completions"].update(
    VLLM_EXTRAS, echo=st.booleans(), continue_final_message=st.booleans(), add_special_tokens=st.booleans(),
    chat_template=st.sampled_from(["{% for m in messages %}{{ m['content'] }}{% endfor %}", "{% bad"]),
    chat_template_kwargs=st.dictionaries(st.text(max_size=6), JSON_LEAF, max_size=2),
    documents=st.lists(st.fixed_dictionaries({"title": TEXT, "text": TEXT}), max_size=2))
ROUTES["/tokenize"].update(continue_final_message=st.booleans(), return_token_strs=st.booleans())

REQUIRED = {"/generate": ["prompt"], "/v1/completions": ["prompt"], "/v1/chat/completions": ["messages"],
            "/tokenize": [], "/detokenize": ["tokens"], "/v1/responses": ["input"],
            "/v1/messages": ["messages", "max_tokens"], "/v1/embeddings": ["input"], "/score": ["text_1", "text_2"],
            "/rerank": ["query", "documents"]}
# Fields that a plausible body only carries when another says so (else each is a 400 of its own).
REFUSED_ALONE = ["suffix", "tools", "previous_response_id"]


def plausible_body(draw, path: str) -> dict:
    """A body that is usually valid: required fields present, cross-field rules mostly kept."""
    fields = ROUTES[path]
    required = {name: fields[name] for name in REQUIRED[path]}
    optional = {k: v for k, v in fields.items() if k not in required and k not in REFUSED_ALONE}
    body = draw(st.fixed_dictionaries(required, optional=optional))
    if not body.get("use_beam_search"):
        body.pop("length_penalty", None)
        body.pop("early_stopping", None)
    else:
        body.update(temperature=0.0, best_of=max(2, body.get("n", 1)))
        for name in ("top_p", "top_k", "min_p", "seed"):
            body.pop(name, None)
    if not body.get("stream"):
        body.pop("stream_options", None)
    if path == "/tokenize" and "prompt" in body:
        body.pop("messages", None)
    return body


@st.composite
def json_requests(draw):  # encoded with json, which (unlike orjson) writes integers past 64 bits
    path = draw(st.sampled_from(sorted(ROUTES)))
    kind = draw(st.sampled_from(["plausible"] * 4 + ["fuzzed"] * 4 + ["any json", "bytes"]))
    if kind == "plausible":
        body = json.dumps(plausible_body(draw, path)).encode()
    elif kind == "fuzzed":
        fields = {name: fuzzed(values) for name, values in ROUTES[path].items()}
        body = json.dumps(draw(st.fixed_dictionaries({}, optional=fields))).encode()
    elif kind == "any json":
        body = json.dumps(draw(ANY_JSON)).encode()
    else:
        body = draw(st.binary(max_size=64))
    return path, body


def count(status: int) -> None:
    COUNTS["sent"] += 1
    COUNTS[f"{status // 100}xx"] += 1


def check_answer(status: int, headers, body: bytes, streamed: bool) -> None:
    assert status < 500, body[:500]
    if status >= 400:
        assert headers.get("Content-Type", "").startswith("application/json"), (status, body[:200])
        answer = orjson.loads(body)
        if answer.get("type") == "error":   # Anthropic's shape, on /v1/messages
            assert set(answer) == {"type", "error"} and set(answer["error"]) == {"type", "message"}, answer
            assert answer["error"]["message"], answer
            return
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    elif streamed and body.startswith(b"event: "):   # typed events: /v1/responses, /v1/messages
        if b"event: error\n" in body:   # as below: only the request's own error, never a 500
            assert b'server_error"' not in body and b'"api_error"' not in body, body[-500:]
            assert b'invalid_request_error"' in body, body[-500:]
    elif streamed and b'"error"' in body:
        # No failure disguised as a 200: an error inside a stream is only the request's own
        # (found after the stream began, e.g. a grammar its other constraints contradict).
        assert b'"server_error"' not in body and b'"invalid_request_error"' in body, body[-500:]


def test_json_bodies_of_every_route(server, fuzz_long):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}

    @examples(fuzz_long, ci=1200, long=30000)
    @given(json_requests())
    def one(request):
        path, body = request
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        count(resp.status)
        check_answer(resp.status, resp.headers, raw,
                     streamed=resp.headers.get("Content-Type", "").startswith(("text/event-stream", "application/x-ndjson")))

    one()
    conn.close()
    assert_alive_and_empty(server)


# ----------------------------------------------------------------------------- raw HTTP
HEADER_NAME = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"), min_size=1, max_size=12)
HEADER_VALUE = st.one_of(st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=30),
                         st.just("\xe9\xe9\xff"), st.just("a" * 9000))


@st.composite
def raw_requests(draw):
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW", "G\x01T"]))
    path = draw(st.sampled_from(sorted(ROUTES) + ["/health", "/metrics", "/v1/models", "/", "/nope",
                                                  "/v1/completions?x=%zz", "/" + "a" * 9000]))
    body = json.dumps(draw(st.fixed_dictionaries({}, optional=ROUTES.get(path, {})))).encode()
    encoding = draw(st.sampled_from([None, None, "gzip", "deflate", "br", "zstd", "identity", "bogus"]))
    mangle = draw(st.sampled_from(["none", "none", "truncate", "garbage"]))
    if encoding == "gzip":
        body = gzip.compress(body)
    elif encoding == "deflate":
        body = zlib.compress(body)
    if mangle == "truncate":
        body = body[:draw(st.integers(0, max(0, len(body) - 1)))]
    elif mangle == "garbage":
        body = draw(st.binary(max_size=40)) + body
    length = draw(st.sampled_from(["right", "right", "right", "short", "none", "chunked", "bad", "both"]))
    headers = [("Host", "x"), ("Connection", "close"), ("Authorization", draw(st.sampled_from(
        [f"Bearer {API_KEY}", "Bearer wrong", "Bearer \xe9\xe9", "", "Basic xyz"])))]
    if encoding:
        headers.append(("Content-Encoding", encoding))
    if length in ("right", "both"):
        headers.append(("Content-Length", str(len(body))))
    elif length == "short":
        headers.append(("Content-Length", str(max(0, len(body) - 5))))
    elif length == "bad":
        headers.append(("Content-Length", draw(st.sampled_from(["-1", "abc", "1e3", " 7", "99999999999999999999"]))))
    if length in ("chunked", "both"):
        headers.append(("Transfer-Encoding", "chunked"))
        body = draw(st.sampled_from([f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n",
                                     b"zz\r\n" + body, f"{len(body) + 9:x}\r\n".encode() + body]))
    headers += draw(st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=3))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1") + body


def exchange(port: int, raw: bytes) -> tuple[int, dict, bytes] | None:
    """One request (Connection: close) on a fresh connection: (status, headers, body), or None
    if the server closed it without a word."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(raw)
        except OSError:  # the server answered and closed while we sent
            pass
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    if headers.get("Transfer-Encoding") == "chunked":
        body = _unchunk(body)
    return int(lines[0].split()[1]), headers, body


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, body = out + rest[:size], rest[size + 2:]
    return out


def test_raw_http_of_every_kind(server, fuzz_long):
    @examples(fuzz_long, ci=300, long=8000)
    @given(raw_requests())
    def one(raw):
        answer = exchange(server.port, raw)
        if answer is None:  # aiohttp closes on some garbage without a word: never a 5xx
            COUNTS["closed"] += 1
            return
        status, headers, body = answer
        count(status)
        if raw.startswith(b"HEAD"):
            body = b""
        check_answer(status, headers, body, streamed=headers.get("Content-Type", "").startswith(
            ("text/event-stream", "application/x-ndjson")))

    one()
    assert_alive_and_empty(server)


# ----------------------------------------------------------------------------- after
def assert_alive_and_empty(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=orjson.dumps({"prompt": "Hello", "max_tokens": 4}),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert orjson.loads(resp.read())["usage"]["completion_tokens"] >= 1
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    stats = server.wait_until(lambda s: s.num_used_blocks == 0 and s.num_running == 0 and s.num_waiting == 0)
    assert (stats.num_used_blocks, stats.num_running, stats.num_waiting) == (0, 0, 0), stats
