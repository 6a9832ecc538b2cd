"""SageMaker's routes, as vLLM serves them: /ping (health) and /invocations (one route for
every generation API, the handler chosen by the body's shape).

SageMaker sends every request to POST /invocations and probes GET /ping. vLLM tries its
request types in order. On a generating model a body with `messages` is a chat completion,
one with `prompt` a completion. On a pooling model (--runner pooling) vLLM offers only the
pooling types, in its order: one with `input` or `messages` is an embeddings request (text or
chat), `query` with `documents` a rerank, `text_1` (or `queries`, `data_1`) a score, and
one with `data` (vLLM's IOProcessorRequest) goes to /pooling, which names what it lacks;
anything else is a 400 naming what was expected.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from aserve.server.app import STATE, health
from aserve.server.errors import APIError
from aserve.server.http_server import read_body


async def ping(request: web.Request) -> web.StreamResponse:
    """GET or POST /ping: /health's answer (200, or 503 with the reason)."""
    return await health(request)


async def invocations(request: web.Request) -> web.StreamResponse:
    from aserve.server import api_chat, api_embeddings, api_openai, api_pooling, api_scores

    # aiohttp keeps the body once read, so the chosen handler reads it again for free.
    raw = await read_body(request, request.app[STATE].limits)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"We could not parse the JSON body of your request: {exc}.") from None
    if isinstance(body, dict) and request.app[STATE].async_engine.engine.pooling:
        if "input" in body or "messages" in body:
            return await api_embeddings.create_embeddings(request)
        if "query" in body and "documents" in body:
            return await api_scores.rerank(request)
        if any(name in body for name in ("text_1", "queries", "data_1")):
            return await api_scores.score(request)
        if "data" in body:
            return await api_pooling.create_pooling(request)
        raise APIError(400, "Cannot find suitable handler for request. Expected one of: EmbeddingRequest "
                            "(with `input` or `messages`), RerankRequest (with `query` and `documents`), "
                            "ScoreRequest (with `text_1` and `text_2`), PoolingRequest (with `data`).")
    if isinstance(body, dict) and "messages" in body:
        return await api_chat.chat_completions(request)
    if isinstance(body, dict) and "prompt" in body:
        return await api_openai.completions(request)
    raise APIError(400, "Cannot find suitable handler for request. Expected one of: "
                        "ChatCompletionRequest (with `messages`), CompletionRequest (with `prompt`).")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ping", ping)
    app.router.add_post("/ping", ping)
    app.router.add_post("/invocations", invocations)
