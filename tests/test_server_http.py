"""The HTTP layer under abuse: broken or bomb-sized compressed bodies, bad bytes in headers,
malformed framing, and clients too slow to finish. Each gets OpenAI's error body (or a closed
socket, for one that never sends a request), and the server goes on serving."""

from __future__ import annotations

import gzip
import resource
import socket
import time

import orjson
import pytest

from aserve.server.http_server import HttpLimits
from server_fixtures import ServerThread

LIMITS = HttpLimits(max_body_bytes=1024 * 1024, keep_alive_timeout_s=1.0, body_read_timeout_s=1.0)
API_KEY = "sesame"


@pytest.fixture(scope="module")
def server():
    with ServerThread(api_key=API_KEY, limits=LIMITS) as s:
        yield s


def exchange(server, raw: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send raw bytes on a fresh connection; (status, headers, body) of the one response."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without a response: {data!r}"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), headers, body


def request_bytes(path: str, body: bytes, headers: dict[str, str] | None = None,
                  content_length: int | None = None) -> bytes:
    head = {"Host": "x", "Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}",
            "Content-Length": str(len(body) if content_length is None else content_length)}
    head.update(headers or {})
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items() if v is not None)
    return f"POST {path} HTTP/1.1\r\n{lines}\r\n".encode("latin-1") + body


def assert_openai_error(status: int, headers: dict, body: bytes, expected_status: int) -> dict:
    assert status == expected_status, body
    assert headers["content-type"].startswith("application/json"), headers
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def assert_still_serving(server):
    body = orjson.dumps({"prompt": "Hello", "max_tokens": 2})
    status, _, raw = exchange(server, request_bytes("/v1/completions", body))
    assert status == 200, raw


COMPLETION = orjson.dumps({"prompt": "Hello", "max_tokens": 2})


def test_a_gzip_body_is_accepted(server):
    status, _, raw = exchange(server, request_bytes("/v1/completions", gzip.compress(COMPLETION),
                                                    {"Content-Encoding": "gzip"}))
    assert status == 200, raw


def test_a_broken_gzip_body_is_a_400(server):
    good = gzip.compress(COMPLETION)
    broken = good[:12] + b"\x00not deflate at all" + good[12:]
    error = assert_openai_error(*exchange(server, request_bytes(
        "/v1/completions", broken, {"Content-Encoding": "gzip"})), 400)
    assert "Content-Encoding: gzip" in error["message"]
    assert_still_serving(server)


def test_a_compression_bomb_is_a_413_without_inflating_it_all(server):
    # 100 MB of zeros in ~100 KB of gzip: the limit (1 MB) applies to the inflated bytes.
    bomb = gzip.compress(b'{"prompt": "' + b"0" * (100 * 1024 * 1024) + b'"}', compresslevel=9)
    assert len(bomb) < 200 * 1024
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; the server is in-process
    error = assert_openai_error(*exchange(server, request_bytes(
        "/v1/completions", bomb, {"Content-Encoding": "gzip"})), 413)
    assert error["code"] == "request_too_large"
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 50, f"the peak memory grew by {grown_mib:.0f} MiB"
    assert_still_serving(server)


@pytest.mark.parametrize("path", ["/v1/models", "/v1/completions"])
def test_a_non_utf8_authorization_header_is_a_401(server, path):
    raw = request_bytes(path, COMPLETION).replace(f"Bearer {API_KEY}".encode(), b"Bearer \xe9\xe9\xff")
    raw = raw.replace(b"POST /v1/models", b"GET /v1/models") if path == "/v1/models" else raw
    error = assert_openai_error(*exchange(server, raw), 401)
    assert error["code"] == "invalid_api_key"


MALFORMED = {
    "bad Content-Length": request_bytes("/v1/completions", COMPLETION, {"Content-Length": "twelve"}),
    "bad chunk size": request_bytes("/v1/completions", b"zz\r\nabc\r\n0\r\n\r\n",
                                    {"Content-Length": None, "Transfer-Encoding": "chunked"}),
    "Content-Length with Transfer-Encoding": request_bytes(
        "/v1/completions", b"3\r\nabc\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"}),
    "headers over 8 KB": request_bytes("/v1/completions", COMPLETION, {"X-Big": "a" * 9000}),
    "not HTTP at all": b"HELLO THERE\r\n\r\n",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_framing_gets_openai_error_bodies(server, name):
    raw = MALFORMED[name]
    assert_openai_error(*exchange(server, raw), 400)
    assert_still_serving(server)


def test_a_body_shorter_than_its_content_length_times_out_with_a_408(server):
    start = time.monotonic()
    error = assert_openai_error(*exchange(server, request_bytes("/v1/completions", COMPLETION[:10],
                                                                 content_length=len(COMPLETION))), 408)
    assert error["code"] == "request_timeout"
    assert time.monotonic() - start < LIMITS.body_read_timeout_s + 3
    assert_still_serving(server)


def _closed_by_server_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(server):
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        assert _closed_by_server_within(idle, LIMITS.keep_alive_timeout_s + 3)


def test_a_client_sending_headers_too_slowly_is_cut_off(server):
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        time.sleep(LIMITS.keep_alive_timeout_s / 2)
        slow.sendall(b"X-Slow: 1\r\n")  # still no end of the head
        assert _closed_by_server_within(slow, LIMITS.keep_alive_timeout_s + 3)


def test_an_idle_keep_alive_connection_is_closed_after_its_response(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        assert _closed_by_server_within(sock, LIMITS.keep_alive_timeout_s + 3)


def test_a_burst_of_connections_while_the_loop_is_busy_waits_no_retry(server):
    """600 clients connect while the event loop is busy (0.5 s): the kernel queues them
    (the listen backlog), so each is answered once the loop is free, none after the
    second-long retry that a dropped connection waits for."""
    server.loop.call_soon_threadsafe(time.sleep, 0.5)
    started = time.monotonic()
    socks = []
    try:
        for _ in range(600):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", server.port))
            socks.append(sock)
        for sock in socks:
            sock.setblocking(True)
            sock.settimeout(10.0)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for sock in socks:
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
        assert time.monotonic() - started < 1.4   # 0.5 s busy; a dropped connection retries at 1 s+
    finally:
        for sock in socks:
            sock.close()
