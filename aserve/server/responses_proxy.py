"""/v1/responses in an API server other than the first (--api-server-count, api_servers.py).

A stored response (store=true, OpenAI's default) is read back by GET, cancel, DELETE,
input_items and previous_response_id, and a background one runs as a task: all in the memory
of one process. So every /v1/responses route of the other API servers passes its request, as
received, to the first one over a Unix socket, and its answer back, a stream chunk by chunk.
The client's key, headers and body go along (the first server checks them again); a client
that goes away cancels the passed request, which aborts its engine request there.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from aserve.server import api_responses
from aserve.server.app import STATE
from aserve.server.http_server import read_body

_SESSION = web.AppKey("aserve_responses_primary", aiohttp.ClientSession)
# Not passed on: about this hop's connection, or no longer true of the body (aiohttp sets the
# length, and has already decompressed what it read).
_HOP_HEADERS = frozenset(("host", "connection", "keep-alive", "content-length", "transfer-encoding",
                          "content-encoding", "upgrade", "te", "trailer", "proxy-connection"))


def add_routes(app: web.Application, primary_path: str) -> None:
    """The /v1/responses routes, each passed to the first API server on primary_path."""

    async def session(app: web.Application):
        app[_SESSION] = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=primary_path),
                                              timeout=aiohttp.ClientTimeout(total=None),
                                              auto_decompress=False)
        yield
        await app[_SESSION].close()

    app.cleanup_ctx.append(session)
    for method, path, _ in api_responses.routes():
        app.router.add_route(method, path, _pass_on)


async def _pass_on(request: web.Request) -> web.StreamResponse:
    body = await read_body(request, request.app[STATE].limits)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
    async with request.app[_SESSION].request(request.method, f"http://primary{request.rel_url}",
                                             headers=headers, data=body) as answer:
        out_headers = {k: v for k, v in answer.headers.items() if _passed_back(k.lower())}
        response = web.StreamResponse(status=answer.status, reason=answer.reason, headers=out_headers)
        await response.prepare(request)
        async for chunk in answer.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def _passed_back(name: str) -> bool:
    """Whether an answer's header goes back to the client: not this hop's, nor one that this
    server sets itself (its own Date and Server, CORS and X-Request-Id headers)."""
    if name == "content-encoding":   # the body goes back as it came (not decompressed)
        return True
    return (name not in _HOP_HEADERS and name not in ("date", "server", "x-request-id")
            and not name.startswith("access-control-"))
