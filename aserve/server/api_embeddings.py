"""POST /v1/embeddings (OpenAI's Embeddings API, as vLLM serves it with --runner pooling).

The prompts are `input` (a string, a list of strings, a list of token ids or a list of such
lists) or, as vLLM's EmbeddingChatRequest, chat `messages` (one conversation or a batch),
rendered with the chat template (add_generation_prompt and add_special_tokens default false,
as vLLM's); each becomes one pooling request (its last token's final hidden state, normalised:
aserve/engine/pooling.py), all queued together. The vectors come back as `encoding_format`
asks (embedding_encodings.py: float, base64, or vLLM's raw "bytes" / "bytes_only"), in
`embed_dtype` and `endianness`. vLLM's other extras: truncate_prompt_tokens, truncation_side,
dimensions, use_activation (normalize, its older name). A server started without
--runner pooling answers 400, as vLLM does for a generative model.
"""

from __future__ import annotations

import time

from aiohttp import web

from aserve.server.app import STATE, ServerState
from aserve.server.pooling_runs import pool, pooled_answer, read_pooling_request, require_pooling_runner
from aserve.server.protocol_pooling import EmbeddingRequest
from aserve.server.random_ids import random_hex_id

__all__ = ["EmbeddingRequest", "create_embeddings", "add_routes"]


async def create_embeddings(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    req: EmbeddingRequest = await read_pooling_request(request, EmbeddingRequest)
    state.check_model(req.model)
    require_pooling_runner(state, "Embeddings API")
    request_id, created = f"embd-{random_hex_id()}", int(time.time())
    outputs = await pool(request, req, request_id, req.pooling_params())
    return pooled_answer(state, req, outputs, request_id, created, "embedding", "embedding")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", create_embeddings)
