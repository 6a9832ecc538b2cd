"""vLLM's scoring routes for an embedding model (--runner pooling): POST /score (/v1/score)
and POST /rerank (/v1/rerank, /v2/rerank: Jina's and Cohere's shape).

With an embedding model, vLLM scores a pair of texts by the cosine similarity of their
embeddings; so does this module, embedding each distinct text once (aserve serves no
cross-encoder models). /score pairs text_1 with text_2 (one text_1 goes with every text_2);
/rerank scores each document against the query and returns them best first, the top_n of
them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional, Union

import torch
from aiohttp import web
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from aserve.pooling_params import PoolingParams
from aserve.server.app import STATE, ServerState, json_response, note_usage, read_request
from aserve.server.engine_requests import add_all, last_output
from aserve.server.errors import APIError
from aserve.server.random_ids import random_hex_id


class ScoreRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    # vLLM's other names for the two sides: queries / data_1, and documents / items / data_2.
    text_1: Union[str, list[str]] = Field(validation_alias=AliasChoices("text_1", "queries", "data_1"))
    text_2: Union[str, list[str]] = Field(validation_alias=AliasChoices("text_2", "documents", "items", "data_2"))
    truncate_prompt_tokens: Optional[int] = None


class RerankRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    query: str
    documents: list[Union[str, dict]]
    top_n: Optional[int] = None
    truncate_prompt_tokens: Optional[int] = None


async def _embed_texts(state: ServerState, texts: list[str], truncate: Optional[int], kind: str
                       ) -> tuple[dict[str, torch.Tensor], int]:
    """Each distinct text's embedding, and the prompt tokens they took."""
    if not state.async_engine.engine.pooling:
        raise APIError(400, "this model generates text; scoring needs an embedding model served with "
                            "--runner pooling.", param="model")
    distinct = list(dict.fromkeys(texts))
    with state.admit(len(distinct)):
        streams = await add_all(state, f"{kind}-{random_hex_id()}", distinct,
                                lambda _: PoolingParams(normalize=True), truncate_prompt_tokens=truncate)
    try:
        outputs = await asyncio.gather(*(last_output(s) for s in streams))
    finally:
        for stream in streams:
            stream.close()
    vectors = {text: torch.tensor(o.outputs.embedding) for text, o in zip(distinct, outputs)}
    return vectors, sum(len(o.prompt_token_ids) for o in outputs)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


async def score(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    req: ScoreRequest = await read_request(request, ScoreRequest)
    state.check_model(req.model)
    first = [req.text_1] if isinstance(req.text_1, str) else req.text_1
    second = [req.text_2] if isinstance(req.text_2, str) else req.text_2
    if not first or not second:
        raise APIError(400, "text_1 and text_2 must not be empty.", param="text_1" if not first else "text_2")
    if len(first) == 1:
        first = first * len(second)
    elif len(first) != len(second):
        raise APIError(400, f"text_1 has {len(first)} texts and text_2 {len(second)}: give as many of each, "
                            "or one text_1 for every text_2.", param="text_2")
    vectors, tokens = await _embed_texts(state, first + second, req.truncate_prompt_tokens, "score")
    note_usage(request, tokens, 0)
    return json_response({
        "id": f"score-{random_hex_id()}", "object": "list", "created": int(time.time()),
        "model": state.served_model_name,
        "data": [{"index": i, "object": "score", "score": _cosine(vectors[a], vectors[b])}
                 for i, (a, b) in enumerate(zip(first, second))],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}})


async def rerank(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    req: RerankRequest = await read_request(request, RerankRequest)
    state.check_model(req.model)
    texts = [_document_text(i, d) for i, d in enumerate(req.documents)]
    if not texts:
        raise APIError(400, "documents must not be empty.", param="documents")
    if req.top_n is not None and req.top_n < 0:
        raise APIError(400, f"top_n must not be negative, got {req.top_n}.", param="top_n")
    vectors, tokens = await _embed_texts(state, [req.query] + texts, req.truncate_prompt_tokens, "rerank")
    note_usage(request, tokens, 0)
    ranked = sorted(((i, _cosine(vectors[req.query], vectors[t])) for i, t in enumerate(texts)),
                    key=lambda pair: pair[1], reverse=True)
    if req.top_n:   # None or 0: every document, as vLLM
        ranked = ranked[:req.top_n]
    return json_response({
        "id": f"rerank-{random_hex_id()}", "model": state.served_model_name, "usage": {"total_tokens": tokens},
        "results": [{"index": i, "document": {"text": texts[i]}, "relevance_score": s} for i, s in ranked]})


def _document_text(index: int, document: Union[str, dict]) -> str:
    if isinstance(document, str):
        return document
    text = document.get("text")
    if not isinstance(text, str):
        raise APIError(400, f"documents[{index}] must be a string or {{\"text\": ...}}.", param="documents")
    return text


def add_routes(app: web.Application) -> None:
    for path in ("/score", "/v1/score"):
        app.router.add_post(path, score)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.router.add_post(path, rerank)
