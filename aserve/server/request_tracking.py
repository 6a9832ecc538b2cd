"""Per-request bookkeeping vLLM's server offers behind flags: X-Request-Id on every response
(--enable-request-id-headers) and the in-flight count that GET /load reports
(--enable-server-load-tracking)."""

from __future__ import annotations


from aiohttp import web

from aserve.server.app import STATE
from aserve.server.random_ids import random_hex_id
from aserve.server.root_path import route_path

# vLLM counts the routes that run a model or a tokenizer. /invocations counts once: the handler
# it dispatches to runs inside the same request.
LOAD_TRACKED_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions", "/v1/responses",
                                "/v1/messages", "/tokenize", "/detokenize", "/invocations"})


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: runs just before any response's headers go out, streams and error
    answers included (a middleware could not add a header to a stream already started)."""
    # The client's id if it sent one (to match its logs with ours), else a fresh one.
    response.headers["X-Request-Id"] = request.headers.get("X-Request-Id") or random_hex_id()


@web.middleware
async def load_tracking_middleware(request: web.Request, handler):
    if route_path(request) not in LOAD_TRACKED_PATHS:
        return await handler(request)
    state = request.app[STATE]
    state.server_load += 1
    try:   # a streamed answer's handler returns when the stream has ended
        return await handler(request)
    finally:
        state.server_load -= 1
