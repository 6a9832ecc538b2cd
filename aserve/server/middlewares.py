"""The middlewares that need nothing of the server's state: errors as OpenAI's (or Anthropic's)
error bodies, and the API key. (Readiness reads the state: app.py.)"""

from __future__ import annotations

import asyncio
import hmac
import logging

from aiohttp import web

from aserve.server.errors import ANTHROPIC_PATHS, APIError, api_error_from
from aserve.server.http_server import error_response
from aserve.server.root_path import route_path

logger = logging.getLogger("aserve.server")


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(APIError(exc.status, exc.reason or "HTTP error",
                                       type="invalid_request_error" if exc.status < 500 else "server_error"),
                              anthropic=_anthropic_route(request))
    except (asyncio.CancelledError, ConnectionError):  # the client left: nothing to answer
        raise
    except Exception as exc:
        err = api_error_from(exc)
        if err is None:  # one request's bug must end that request only
            logger.exception("request %s %s failed", request.method, request.path)
            err = APIError(500, f"Internal server error: {exc!r}", type="server_error")
        return error_response(err, anthropic=_anthropic_route(request))


def _anthropic_route(request: web.Request) -> bool:
    """Anthropic's routes answer errors in Anthropic's shape (its clients parse that one)."""
    return route_path(request).startswith(ANTHROPIC_PATHS)


def auth_middleware(api_key: str):
    """/v1 routes and /invocations need the key: `Authorization: Bearer KEY` (any case of
    the scheme) or Anthropic's `x-api-key: KEY`; a 401 in the route's error shape otherwise."""
    expected = f"Bearer {api_key}".encode()
    expected_bare = api_key.encode()

    @web.middleware
    async def auth(request: web.Request, handler):
        # /invocations runs the /v1 completions: vLLM leaves it open, which would let a
        # client around the key; aserve guards it too. OPTIONS asks what a route allows and
        # runs nothing: open, as in vLLM.
        path = route_path(request)
        if request.method != "OPTIONS" and (path.startswith("/v1") or path == "/invocations"):
            # surrogateescape: aiohttp keeps a header's undecodable (non-UTF-8) bytes as
            # surrogates, which a plain encode() refuses (that was a 500, not a 401).
            given = _bearer_cased(request.headers.get("Authorization", "")).encode("utf-8", "surrogateescape")
            # Anthropic's clients send the key as x-api-key.
            given_bare = request.headers.get("x-api-key", "").encode("utf-8", "surrogateescape")
            # compare_digest: the time taken must not reveal how much of the key matched.
            if not (hmac.compare_digest(given, expected) or hmac.compare_digest(given_bare, expected_bare)):
                return error_response(APIError(401, "Incorrect API key provided. Pass it as "
                                                    "'Authorization: Bearer <key>' (or 'x-api-key: <key>').",
                                               code="invalid_api_key"), anthropic=_anthropic_route(request))
        return await handler(request)

    return auth


def _bearer_cased(authorization: str) -> str:
    """An Authorization value with its scheme written "Bearer": HTTP's schemes are
    case-insensitive ("bearer", "BEARER"), as vLLM compares them."""
    scheme, space, credentials = authorization.partition(" ")
    return f"Bearer {credentials}" if space and scheme.lower() == "bearer" else authorization
