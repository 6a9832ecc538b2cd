"""What /v1/embeddings and /pooling share between reading a body and answering it: the body
read and checked (a chat conversation sent as `input` moved to `messages`, as vLLM does; a
prompt too long for the context refused before validation), and the prompts (texts, token
ids, or conversations rendered with the chat template, as /v1/chat/completions renders them)
pooled together by the engine.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from aserve.outputs import EmbeddingRequestOutput
from aserve.pooling_params import PoolingParams
from aserve.server.app import STATE, ServerState, json_response, note_usage, read_request
from aserve.server.embedding_encodings import bytes_response, encoded_vector, is_binary
from aserve.server.engine_requests import add_all, last_output
from aserve.server.errors import APIError
from aserve.server.prompts import ChatTemplateOptions, chat_prompt_ids, refuse_giant_prompts
from aserve.server.protocol_pooling import PoolingInputRequest


async def read_pooling_request(request: web.Request, model_cls: type[PoolingInputRequest]) -> Any:
    """Read and validate a pooling body as app.read_request does (prompts in `input`), a
    conversation sent as `input` moved to `messages` first, and each conversation of a batch
    held to the context on its own."""
    state: ServerState = request.app[STATE]

    def precheck(body: dict) -> None:
        _conversation_input_as_messages(body)
        messages = body.get("messages")
        if isinstance(messages, list) and messages and all(isinstance(m, list) for m in messages):
            for conversation in messages:
                refuse_giant_prompts(state, {"messages": conversation})

    return await read_request(request, model_cls, prompt_field="input", precheck=precheck)


def _conversation_input_as_messages(body: dict) -> None:
    """vLLM takes a conversation (or a batch of them) as `input` too: a list of dicts that
    each have a string `role`. Moved before the token-id checks, which would cut it as ids."""
    value = body.get("input")
    if "messages" in body or not isinstance(value, list) or not value:
        return
    if all(_is_conversation(one) for one in value) or _is_conversation(value):
        body["messages"] = body.pop("input")


def _is_conversation(value: Any) -> bool:
    if not isinstance(value, list) or not value:
        return False
    return all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value)


def require_pooling_runner(state: ServerState, api: str) -> None:
    if not state.async_engine.engine.pooling:
        raise APIError(400, f"this model generates text; the {api} needs a model served with --runner pooling.",
                       param="model")


async def pool(request: web.Request, req: PoolingInputRequest, request_id: str,
               params: PoolingParams) -> list[EmbeddingRequestOutput]:
    """Every prompt of the request pooled, in order; the prompt tokens noted for the access log."""
    state: ServerState = request.app[STATE]
    req.check_prompts()
    field = "input" if req.input is not None else "messages"
    conversations = req.conversations() if req.messages is not None else []
    with state.admit(len(conversations) or len(req.prompts())):
        if req.messages is None:
            prompts = req.prompts()
        else:
            options = ChatTemplateOptions(
                continue_final_message=req.continue_final_message, add_special_tokens=req.special_tokens(),
                chat_template=req.chat_template, chat_template_kwargs=req.chat_template_kwargs)
            prompts = [await chat_prompt_ids(state, conversation, req.add_generation_prompt, options)
                       for conversation in conversations]
        streams = await add_all(state, request_id, prompts, lambda _: params, add_special_tokens=req.special_tokens(),
                                truncate_prompt_tokens=req.truncate_prompt_tokens, field=field,
                                truncation_side=req.truncation_side)
    try:
        outputs = await asyncio.gather(*(last_output(s) for s in streams))
    finally:
        for stream in streams:
            stream.close()
    note_usage(request, prompt_tokens(outputs), 0)
    return outputs


def pooled_answer(state: ServerState, req: PoolingInputRequest, outputs: list[EmbeddingRequestOutput],
                  request_id: str, created: int, item_object: str, vector_field: str) -> web.Response:
    """The vectors as the request's encoding asks: raw bytes, or the JSON list whose items are
    {"index", "object": item_object, vector_field: the vector} (/v1/embeddings: "embedding"
    and "embedding"; /pooling: "pooling" and "data")."""
    vectors = [o.outputs.embedding for o in outputs]
    if is_binary(req.encoding_format):
        return bytes_response(vectors, prompt_tokens(outputs), request_id, created, state.served_model_name,
                              req.encoding_format, req.embed_dtype, req.endianness)
    return json_response({
        "id": request_id, "object": "list", "created": created, "model": state.served_model_name,
        "data": [{"index": i, "object": item_object,
                  vector_field: encoded_vector(v, req.encoding_format, req.embed_dtype, req.endianness)}
                 for i, v in enumerate(vectors)],
        "usage": usage(outputs)})


def prompt_tokens(outputs: list[EmbeddingRequestOutput]) -> int:
    return sum(len(o.prompt_token_ids) for o in outputs)


def usage(outputs: list[EmbeddingRequestOutput]) -> dict:
    tokens = prompt_tokens(outputs)
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "prompt_tokens_details": None}
