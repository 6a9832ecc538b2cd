"""Streamed answers (server-sent events for /v1, JSON lines for /generate): once the headers
are out, an error can only travel inside the stream, as its last event.

A client that leaves mid-stream is no error: the write fails with a ConnectionError, the
handler returns, and closing its request streams aborts the requests (the engine logs one INFO
line for each); nothing is logged as a failure.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import orjson
from aiohttp import web

from aserve.server.access_log import CLIENT_GONE
from aserve.server.errors import APIError, api_error_from

logger = logging.getLogger("aserve.server")


async def open_stream(request: web.Request, content_type: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
    if request.version >= (1, 1):
        # What aiohttp picks anyway for a body of unknown length; asked for by name, so that
        # response.chunked says it (chunk_sink.py frames its own writes by it).
        response.enable_chunked_encoding()
    await response.prepare(request)
    return response


def sse_event(body: dict) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def send_sse(response: web.StreamResponse, body: dict) -> None:
    await response.write(sse_event(body))


class SSEEvents:
    """A streamed answer's events: written as they come, except the last ones (the final
    output's chunks, the usage), which end() writes with [DONE] and the end of the chunked body
    in one write, not one write (and one send on the socket) each."""

    def __init__(self, response: web.StreamResponse) -> None:
        self._response = response
        self._held: list[bytes] = []

    async def send(self, body: dict, last: bool = False) -> None:
        if last:
            self._held.append(sse_event(body))
        else:
            await send_sse(self._response, body)

    async def end(self) -> None:
        await self._response.write_eof(b"".join(self._held) + b"data: [DONE]\n\n")


async def send_sse_error_and_done(response: web.StreamResponse, err: APIError) -> None:
    """OpenAI's error body as the stream's last event, then [DONE]."""
    await response.write(b"data: " + err.body() + b"\n\ndata: [DONE]\n\n")


async def send_json_line_error(response: web.StreamResponse, err: APIError) -> None:
    await response.write(err.body() + b"\n")


def request_failed(error: str) -> APIError:
    """The error of a request the engine ended with one (a fault in its step). A grammar the
    engine could not compile is the request's own fault: a 400 (the door's check usually
    finds it first)."""
    if error.startswith("structured_outputs"):
        return APIError(400, error, param="structured_outputs")
    # "Internal server error", as vLLM words a failed generation (clients' tests look for it).
    return APIError(500, f"Internal server error: the request failed: {error}", type="server_error")


async def stream_or_report(request: web.Request, response: web.StreamResponse, streaming: Awaitable,
                           send_error: Callable[[web.StreamResponse, APIError], Awaitable]) -> None:
    """Run a streaming coroutine; an error it raises goes into the stream as its last event."""
    try:
        await streaming
    except ConnectionError:
        request[CLIENT_GONE] = True
    except Exception as exc:
        err = api_error_from(exc)
        if err is None:
            logger.error("streaming a response failed", exc_info=exc)
            err = APIError(500, f"Internal server error: {exc!r}", type="server_error")
        try:
            await send_error(response, err)
            await response.write_eof()
        except ConnectionError:
            request[CLIENT_GONE] = True
