"""POST /pooling (vLLM's Pooling API), for a model served with --runner pooling.

The body is /v1/embeddings' (`input` or chat `messages`, the same chat extras, truncation and
encodings) plus vLLM's `task`: this engine pools for "embed" only (the model's task, taken
when none is given), so each prompt's answer is its embedding, as `data[i].data` with
`object` "pooling". As vLLM, `dimensions` is refused here (it belongs to /v1/embeddings),
other pooling tasks are named unsupported, the removed ones ("score", "encode") and a plugin
body (`data` alone) get vLLM's words. A generating server answers 400, as /v1/embeddings.
"""

from __future__ import annotations

import time

from aiohttp import web

from aserve.server.app import STATE, ServerState
from aserve.server.pooling_runs import pool, pooled_answer, read_pooling_request, require_pooling_runner
from aserve.server.protocol_pooling import PoolingRequest
from aserve.server.random_ids import random_hex_id


async def create_pooling(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    req: PoolingRequest = await read_pooling_request(request, PoolingRequest)
    state.check_model(req.model)
    require_pooling_runner(state, "Pooling API")
    req.check_task()
    request_id, created = f"pooling-{random_hex_id()}", int(time.time())
    outputs = await pool(request, req, request_id, req.pooling_params())
    return pooled_answer(state, req, outputs, request_id, created, "pooling", "data")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/pooling", create_pooling)
