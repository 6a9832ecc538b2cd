"""POST /v1/embeddings (OpenAI's Embeddings API, as vLLM serves it with --runner pooling).

`input` is a string, a list of strings, a list of token ids or a list of such lists; each
becomes one pooling request (its last token's final hidden state, normalised: aserve/engine/
pooling.py), all queued together. `encoding_format` "float" gives lists of numbers, "base64"
the little-endian float32 bytes, as OpenAI's client decodes them. vLLM's extras:
truncate_prompt_tokens, add_special_tokens (default true for embeddings, as vLLM), normalize.
A server started without --runner pooling answers 400, as vLLM does for a generative model.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Literal, Optional, Union

import numpy as np
from aiohttp import web
from pydantic import BaseModel, ConfigDict

from aserve.pooling_params import PoolingParams
from aserve.server.app import STATE, ServerState, json_response, note_usage, read_request
from aserve.server.engine_requests import add_all, last_output
from aserve.server.errors import APIError
from aserve.server.random_ids import random_hex_id


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None
    truncate_prompt_tokens: Optional[int] = None
    truncation_side: Optional[Literal["left", "right"]] = None   # as on /v1/completions
    add_special_tokens: bool = True
    normalize: Optional[bool] = None
    use_activation: Optional[bool] = None   # vLLM's newer name for normalize (normalize wins if both)

    def prompts(self) -> list:
        value = self.input
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]
        if not value:
            raise APIError(400, "input must not be empty.", param="input")
        return list(value)

    def pooling_params(self) -> PoolingParams:
        try:
            normalize = self.normalize if self.normalize is not None else self.use_activation
            return PoolingParams(dimensions=self.dimensions, normalize=normalize)
        except ValueError as exc:
            raise APIError(400, str(exc), param="dimensions") from None


async def create_embeddings(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    req: EmbeddingRequest = await read_request(request, EmbeddingRequest, prompt_field="input")
    state.check_model(req.model)
    if not state.async_engine.engine.pooling:
        raise APIError(400, "this model generates text; the Embeddings API needs a model served with "
                            "--runner pooling.", param="model")
    prompts, params = req.prompts(), req.pooling_params()
    request_id = f"embd-{random_hex_id()}"
    with state.admit(len(prompts)):
        streams = await add_all(state, request_id, prompts, lambda _: params,
                                add_special_tokens=req.add_special_tokens,
                                truncate_prompt_tokens=req.truncate_prompt_tokens, field="input",
                                truncation_side=req.truncation_side)
    try:
        outputs = await asyncio.gather(*(last_output(s) for s in streams))
    finally:
        for stream in streams:
            stream.close()
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    note_usage(request, prompt_tokens, 0)
    return json_response({
        "id": request_id, "object": "list", "created": int(time.time()), "model": state.served_model_name,
        "data": [{"index": i, "object": "embedding", "embedding": _encoded(o.outputs.embedding, req.encoding_format)}
                 for i, o in enumerate(outputs)],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0,
                  "prompt_tokens_details": None}})


def _encoded(vector: list[float], encoding_format: str):
    if encoding_format == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", create_embeddings)
