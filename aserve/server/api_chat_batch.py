"""POST /v1/chat/completions/batch (vLLM's): several conversations in one request, one answer.

The body is a chat request whose `messages` is a list of conversations. Each conversation
becomes its own engine request with the body's other fields; the answer is one chat
completion whose choice i answers conversation i, and whose usage counts them all. As in
vLLM, nothing is streamed and tools, beam search and n > 1 are refused.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from aserve.server.api_chat import chat_choice, chat_usage
from aserve.server.app import STATE, ServerState, json_response, read_request
from aserve.server.chat_reply import chat_reply, template_options
from aserve.server.engine_requests import add_all, fill_max_tokens, last_output
from aserve.server.prompts import chat_prompt_ids
from aserve.server.protocol import BatchChatCompletionRequest
from aserve.server.protocol_answers import ChatCompletionResponse
from aserve.server.reasoning import ReasoningView
from aserve.server.structured_request import check_grammar, constraint_field
from aserve.server.tool_calls import plan_tools


async def chat_completions_batch(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    batch: BatchChatCompletionRequest = await read_request(request, BatchChatCompletionRequest)
    state.check_model(batch.model)
    singles = batch.single_requests()
    tool_plan = plan_tools(None, batch.tool_choice, state.tool_call_parser)   # no tools: plain answers
    params = singles[0].to_sampling_params(tool_plan.constraint, state.sampling_defaults)
    request_id = batch.response_id("chatcmpl")
    model, created = state.served_model_name, int(time.time())
    streams, views = [], []
    try:
        with state.admit(len(singles)):
            await check_grammar(state, params, constraint_field(batch))
            for i, single in enumerate(singles):
                prompt_ids = await chat_prompt_ids(state, single.conversation(), single.add_generation_prompt,
                                                   template_options(single))
                view = ReasoningView(state.reasoning, prompt_ids, single.include_reasoning, 1,
                                     single.separate_reasoning)
                gated = state.reasoning.gate(params, prompt_ids) if view.active else params
                (stream,) = await add_all(state, f"{request_id}_{i}", [prompt_ids],
                                          lambda num_tokens, p=gated: fill_max_tokens(state, p, num_tokens))
                streams.append(stream)
                views.append(view)
        finals = await asyncio.gather(*(last_output(s) for s in streams))
        choices = []
        for i, (single, view, final) in enumerate(zip(singles, views, finals)):
            # The role, and the echo of this conversation's own last message.
            reply = chat_reply(single, state.return_tokens_as_token_ids, state.response_role)
            choices.append(await chat_choice(state, single, reply, view, tool_plan, final.outputs[0], i))
        body = ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                      usage=chat_usage(request, finals, views)).model_dump()
        if batch.return_token_ids:   # each choice's own ids, as vLLM's batch answers
            for choice, final in zip(body["choices"], finals):
                choice["token_ids"] = list(final.outputs[0].token_ids)
        return json_response(body)
    finally:
        for s in streams:
            s.close()  # aborts whatever has not finished: the client left, or something failed


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions/batch", chat_completions_batch)
