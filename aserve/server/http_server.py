"""Where HTTP meets the process: the aiohttp runner and its timeouts, request bodies read with
their limits, and aiohttp's own error answers in OpenAI's shape.

aiohttp answers what its parser refuses (a bad Content-Length or chunk size, Content-Length
with Transfer-Encoding, headers over 8 KB) itself, before any middleware, as text/plain, and
logs each as an ERROR with a traceback. Those answers come from RequestHandler.handle_error;
the runner below makes every connection's handler one whose handle_error writes OpenAI's
error body and logs a client's mistake as one INFO line.

Timeouts: aiohttp closes a connection that sends no complete request head within the
keep-alive timeout (its timer runs from the connection's start, and again from each response's
end), which bounds idle sockets and slow headers alike; a body that stops arriving short of its
Content-Length is cut off by read_body's own timeout.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Optional

from aiohttp import web, web_protocol, web_server
from aiohttp.http_exceptions import HttpProcessingError

from aserve.server.errors import APIError

logger = logging.getLogger("aserve.server")


@dataclass(frozen=True)
class HttpLimits:
    """How much a client may send, and how long it may take (README: Operations)."""

    max_body_bytes: int = 32 * 1024 * 1024   # far above any real prompt, far below harm
    keep_alive_timeout_s: float = 5.0        # vLLM's (uvicorn's) default
    body_read_timeout_s: float = 30.0


def error_response(err: APIError, anthropic: bool = False) -> web.Response:
    """err as OpenAI's error body, or as Anthropic's (the /v1/messages routes)."""
    response = web.Response(body=err.anthropic_body() if anthropic else err.body(), status=err.status,
                            content_type="application/json", headers=err.headers)
    if err.close:
        response.force_close()
    return response


async def read_body(request: web.Request, limits: HttpLimits) -> bytes:
    """The request body (decompressed as its Content-Encoding says), or an APIError: 408 when it
    stops arriving, 413 past the limit (counted on the decompressed bytes, chunk by chunk as
    aiohttp inflates them, so a small compressed bomb never grows past it), 400 when it cannot
    be decoded."""
    try:
        async with asyncio.timeout(limits.body_read_timeout_s):
            return await request.read()
    except TimeoutError:
        raise APIError(408, f"The request body did not arrive within {limits.body_read_timeout_s:g} s "
                            "(is Content-Length larger than the body?).",
                       code="request_timeout", close=True) from None
    except web.HTTPRequestEntityTooLarge:
        _stop_reading(request)
        raise APIError(413, f"The request body is larger than the server's limit of "
                            f"{limits.max_body_bytes} bytes (after decompression).",
                       code="request_too_large", close=True) from None
    except (HttpProcessingError, web_protocol.RequestPayloadError) as exc:
        _stop_reading(request)
        encoding = request.headers.get("Content-Encoding")
        what = f"decoded (Content-Encoding: {encoding})" if encoding else "read"
        raise APIError(400, f"The request body could not be {what}: {_reason(exc)}.",
                       close=True) from None


def _stop_reading(request: web.Request) -> None:
    # aiohttp would otherwise read (and inflate) the rest of a refused body after the answer,
    # or log the broken payload's error as an unhandled exception; the connection closes anyway.
    if request.headers.get("Content-Encoding"):
        request.content.feed_eof()


def _reason(exc: BaseException) -> str:
    """One line (aiohttp's parser messages add the offending line and a caret under it)."""
    text = (getattr(exc, "message", None) or str(exc) or type(exc).__name__).strip().splitlines()[0]
    return (text[:200] + "...") if len(text) > 200 else text.rstrip(".")


class _RequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, answering its own errors in OpenAI's shape."""

    __slots__ = ()  # the same layout, so an aiohttp handler can become one (see _Server)

    def handle_error(self, request, status: int = 500, exc=None, message=None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: the answer has begun, the stream is broken
            raise ConnectionError("Response is sent already, cannot send another response "
                                  "with the error message")
        if status >= 500:
            logger.error("error handling a request from %s", request.remote, exc_info=exc)
            err = APIError(status, "Internal server error." if status == 500 else
                           "The request handler timed out.", type="server_error")
        else:  # the client's malformed HTTP: its mistake, not ours
            reason = _reason(exc) if exc is not None else (message or "bad request")
            logger.info("refused a malformed HTTP request from %s: %s", request.remote, reason)
            err = APIError(status, f"Malformed HTTP request: {reason}.")
        err.close = True
        return error_response(err)


# Connections the kernel holds for the loop to accept. aiohttp's default of 128 is overrun by a
# burst of clients (a benchmark's 1000 requests at once): a connection past it is dropped and
# its client's retry comes a second or more later. uvicorn, vLLM's server, listens with 2048.
LISTEN_BACKLOG = 2048


class _Server(web_server.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        handler = super().__call__()
        handler.__class__ = _RequestHandler
        return handler


class _AppRunner(web.AppRunner):
    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # only its protocol factory differs
        return server


def check_port_free(host: str, port: int) -> None:
    """Raise OSError (EADDRINUSE) if anything listens on host:port already. Servers that share
    a port (reuse_port, api_servers.py) would otherwise bind it beside another program that set
    SO_REUSEPORT too (another aserve of the same user), and the kernel would split the
    connections between them; a bind without the option fails instead."""
    if port == 0:
        return
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the site binds
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)


async def start_site(app: web.Application, host: str, port: int, limits: HttpLimits,
                     shutdown_timeout_s: float = 1.0, reuse_port: bool = False,
                     unix_path: Optional[str] = None) -> tuple[web.AppRunner, int]:
    """Start serving app; returns the runner (for cleanup) and the bound port (port 0 picks
    one). Handlers are cancelled when their client disconnects (handler_cancellation), which
    aborts their requests. shutdown_timeout_s: how long runner.cleanup() lets handlers finish
    (the server drains requests itself first, see serving.py). reuse_port: other processes may
    listen on the port too (SO_REUSEPORT: the kernel spreads new connections over them).
    unix_path: also serve on that Unix socket (the other API servers' way in, api_servers.py)."""
    runner = _AppRunner(app, handler_cancellation=True, access_log=None,
                        keepalive_timeout=limits.keep_alive_timeout_s,
                        shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG, reuse_port=reuse_port or None)
    await site.start()
    if unix_path is not None:
        await web.UnixSite(runner, unix_path, backlog=LISTEN_BACKLOG).start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, bound
