"""One INFO line per request (vLLM logs each through uvicorn's access log; --disable-log-requests
turns it off): who, what, the status, how long, and the tokens in and out.

    127.0.0.1 "POST /v1/completions" 200 0.412s prompt_tokens=12 completion_tokens=16

A client that left before the answer was complete shows as 499 (nginx's "client closed
request"); the engine's own line for its abort ("Aborted request ...") says which request.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

access_logger = logging.getLogger("aserve.access")



def _request_key(name: str, kind: type):
    # aiohttp 3.13+ wants typed keys for a request's storage; older versions take strings.
    return web.RequestKey(name, kind) if hasattr(web, "RequestKey") else name


USAGE = _request_key("aserve_usage", tuple)              # (prompt tokens, completion tokens)
CLIENT_GONE = _request_key("aserve_client_gone", bool)   # the client left while its answer streamed
CLIENT_CLOSED_STATUS = 499


@web.middleware
async def access_log_middleware(request: web.Request, handler):
    start = time.monotonic()
    status = CLIENT_CLOSED_STATUS
    try:
        response = await handler(request)
        if not request.get(CLIENT_GONE):
            status = response.status
        return response
    except (asyncio.CancelledError, ConnectionError):
        raise  # the client left before any answer: 499
    finally:
        usage = request.get(USAGE)
        tokens = f" prompt_tokens={usage[0]} completion_tokens={usage[1]}" if usage else ""
        access_logger.info('%s "%s %s" %d %.3fs%s', request.remote, request.method, request.path,
                           status, time.monotonic() - start, tokens)
