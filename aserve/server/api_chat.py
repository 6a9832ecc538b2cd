"""POST /v1/chat/completions in OpenAI's shape (vLLM's extras accepted): the conversation
rendered by the chat template, then one engine request whose n samples are the choices. Tool
calls and reasoning are parsed out of the text (tool_calls.py, reasoning.py); a stream sends
the role first, then each choice's deltas (api_openai.py says how streams hold back).
"""

from __future__ import annotations

import time
from typing import Optional

from aiohttp import web

from aserve.outputs import RequestOutput
from aserve.server.api_openai import holds_back, total_usage, usage_wanted
from aserve.server.app import STATE, ServerState, json_response, read_request
from aserve.server.chat_reply import chat_reply, template_options
from aserve.server.chunk_sink import TEXT_MARK, ChoiceProgress, TextChunkSink
from aserve.server.engine_requests import add_all, fill_max_tokens, last_output
from aserve.server.openai_logprobs import chat_logprobs, prompt_logprobs_out
from aserve.server.prompts import chat_prompt_ids
from aserve.server.protocol import ChatCompletionRequest
from aserve.server.protocol_answers import (ChatChoice, ChatChoiceLogprobs, ChatCompletionChunk,
                                            ChatCompletionResponse, ChatResponseMessage, ChatStreamChoice,
                                            CompletionTokensDetails, DeltaMessage, UsageInfo)
from aserve.server.reasoning import ReasoningView
from aserve.server.stream_chunks import chat_content_chunk
from aserve.server.streaming import (SSEEvents, open_stream, request_failed, send_sse, send_sse_error_and_done,
                                     stream_or_report)
from aserve.server.structured_request import check_grammar, constraint_field
from aserve.server.tool_calls import (choice_stream, finish_reason, keep_special_tokens_for_parser, plan_tools,
                                      response_message)


def chat_usage(request: web.Request, finals: list[RequestOutput], views: list[ReasoningView]) -> UsageInfo:
    """A chat answer's usage; with a reasoning parser, how many completion tokens were
    thinking (completion_tokens_details.reasoning_tokens), as vLLM reports it."""
    usage = total_usage(request, finals)
    if any(view.active for view in views):
        usage.completion_tokens_details = CompletionTokensDetails(reasoning_tokens=sum(
            view.reasoning_tokens(o.token_ids, o.text) for final, view in zip(finals, views) for o in final.outputs))
    return usage



def _chunk(request_id: str, created: int, model: str, choice: ChatStreamChoice,
           usage: Optional[UsageInfo] = None) -> dict:
    body = ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice],
                               usage=usage).model_dump()
    delta = body["choices"][0]["delta"]
    body["choices"][0]["delta"] = {k: v for k, v in delta.items() if v is not None}
    return body


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    req: ChatCompletionRequest = await read_request(request, ChatCompletionRequest)
    state.check_model(req.model)
    tool_plan = plan_tools(req.tools, req.tool_choice, state.tool_call_parser)
    params = req.to_sampling_params(tool_plan.constraint, state.sampling_defaults)
    keep_special_tokens_for_parser(tool_plan, params)
    reply = chat_reply(req, state.return_tokens_as_token_ids, state.response_role)
    request_id = req.response_id("chatcmpl")
    model, created = state.served_model_name, int(time.time())
    with state.admit():
        await check_grammar(state, params, constraint_field(req))
        prompt_ids = await chat_prompt_ids(state, req.conversation(), req.add_generation_prompt,
                                           template_options(req), tools=tool_plan.template_tools())
        view = ReasoningView(state.reasoning, prompt_ids, req.include_reasoning, params.n, req.separate_reasoning)
        if view.active:   # a constraint applies to the answer, after the thinking
            params = state.reasoning.gate(params, prompt_ids)
        (stream,) = await add_all(state, request_id, [prompt_ids],
                                  lambda num_tokens: fill_max_tokens(state, params, num_tokens))
    try:
        if not req.stream:
            final = await last_output(stream)
            choices = [await chat_choice(state, req, reply, view, tool_plan, o, j) for j, o in enumerate(final.outputs)]
            prompt_logprobs = (await prompt_logprobs_out(final.prompt_logprobs)
                               if final.prompt_logprobs is not None else None)
            body = ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                          usage=chat_usage(request, [final], [view]),
                                          prompt_logprobs=prompt_logprobs).model_dump()
            if req.return_token_ids:   # vLLM's: the prompt's ids on the response, each choice's own
                body["prompt_token_ids"] = list(final.prompt_token_ids)
                for choice, o in zip(body["choices"], final.outputs):
                    choice["token_ids"] = list(o.token_ids)
            return json_response(body)

        response = await open_stream(request, "text/event-stream")
        await stream_or_report(request, response, _stream_chat(
            request, state, req, params, reply, request_id, created, stream, response, prompt_ids,
            tool_plan, view),
            send_sse_error_and_done)
        return response
    finally:
        stream.close()


async def chat_choice(state: ServerState, req: ChatCompletionRequest, reply, view: ReasoningView, tool_plan,
                      output, index: int) -> ChatChoice:
    """One finished output as a non-streamed chat choice: the thinking apart, tool calls
    parsed, the echoed message first, logprobs if asked."""
    reasoning, text = view.final(output.text)
    content, tool_calls, finish = response_message(tool_plan, text, output.finish_reason)
    if view.active and not content and not tool_calls:
        content = None   # all thinking so far (cut off): no answer, as vLLM says
    if reply.echoed and content is not None:
        content = reply.echoed + content
    return ChatChoice(
        index=index, message=ChatResponseMessage(role=reply.role, content=content, tool_calls=tool_calls,
                                                 reasoning=reasoning),
        logprobs=ChatChoiceLogprobs(content=await chat_logprobs(
            state, output.token_ids, output.logprobs, reply.top_n, reply.as_ids)) if req.logprobs else None,
        finish_reason=finish, stop_reason=output.stop_reason)


async def _stream_chat(request, state, req, params, reply, request_id, created, stream, response,
                       prompt_ids: list[int], tool_plan, view: ReasoningView) -> None:
    model = state.served_model_name
    num_prompt_tokens = len(prompt_ids)
    final_usage, continuous = usage_wanted(state, req.stream_options)
    tool_streams = [choice_stream(tool_plan) for _ in range(params.n)]  # None: plain content

    def usage_so_far(completion_tokens: int) -> Optional[UsageInfo]:
        if not continuous:
            return None
        return UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=num_prompt_tokens + completion_tokens)

    for j in range(params.n):  # the role comes first, before any content, as OpenAI does
        body = _chunk(request_id, created, model, ChatStreamChoice(
            index=j, delta=DeltaMessage(role=reply.role, content="")), usage_so_far(0))
        if req.return_token_ids and j == 0:   # vLLM's: the prompt's ids on the stream's first chunk
            body["prompt_token_ids"] = list(prompt_ids)
        await send_sse(response, body)
    if reply.echoed:  # then the echoed message, as vLLM streams it
        for j in range(params.n):
            await send_sse(response, _chunk(request_id, created, model, ChatStreamChoice(
                index=j, delta=DeltaMessage(content=reply.echoed)), usage_so_far(0)))
    sent = [ChoiceProgress() for _ in range(params.n)]
    # One plain choice: its chunks go out from the dispatch.
    if (params.n == 1 and tool_streams[0] is None and not req.logprobs and not continuous
            and not holds_back(params) and not view.active and not req.return_token_ids):
        stream.set_sink(TextChunkSink(request.transport, response.chunked, sent[0],
                                      chat_content_chunk(request_id, created, model, 0, TEXT_MARK, None, None)))
    final, events = None, SSEEvents(response)
    async for final in stream:
        if final.error:
            raise request_failed(final.error)
        if holds_back(params) and not final.finished:
            continue
        for j, o in enumerate(final.outputs[:params.n]):
            st = sent[j]
            if st.done:
                continue
            if view.active:   # the thinking goes out as `reasoning`, the rest as the answer
                reasoning, text = view.step(j, o.text, o.finish_reason is not None)
            else:
                reasoning, text = None, o.text[st.text_len:]
            new_ids = o.token_ids[st.num_tokens:]
            lps = None
            if req.logprobs and new_ids:
                lps = ChatChoiceLogprobs(content=await chat_logprobs(
                    state, new_ids, (o.logprobs or [])[st.num_tokens:], reply.top_n, reply.as_ids))
            st.text_len, st.num_tokens = len(o.text), len(o.token_ids)
            st.done = o.finish_reason is not None
            tool_deltas, finish = None, o.finish_reason
            if tool_streams[j] is not None:  # the text becomes tool-call fragments (and content)
                delta = tool_streams[j].feed(text)
                if st.done:
                    rest = tool_streams[j].finish()
                    delta.content += rest.content
                    delta.tool_calls += rest.tool_calls
                    finish = finish_reason(tool_plan, o.finish_reason, tool_streams[j].called)
                text, tool_deltas = delta.content, delta.tool_calls or None
            # One chunk per step that brought tokens, even with no character yet (empty content),
            # as vLLM streams, so clients that count chunks as tokens count right. Not inside a
            # tool call, whose text the parser holds back, nor (as vLLM) a tag the reasoning
            # parser holds back.
            plain = tool_streams[j] is None
            empty_chunk = plain and new_ids and not st.done and not view.active
            content = text if text or empty_chunk else None
            body = None
            if plain and lps is None and not continuous and reasoning is None:
                if text or empty_chunk or st.done:  # the common chunk, built without pydantic
                    body = chat_content_chunk(request_id, created, model, j, content, finish, o.stop_reason)
            elif content is not None or tool_deltas or st.done or lps is not None or reasoning is not None:
                body = _chunk(request_id, created, model, ChatStreamChoice(
                    index=j, delta=DeltaMessage(content=content, reasoning=reasoning, tool_calls=tool_deltas),
                    logprobs=lps, finish_reason=finish, stop_reason=o.stop_reason), usage_so_far(len(o.token_ids)))
            if body is not None:
                if req.return_token_ids:   # vLLM's: the step's new ids
                    body["choices"][0]["token_ids"] = list(new_ids)
                await events.send(body, last=final.finished)
    usage = chat_usage(request, [final], [view])
    if final_usage:
        await events.send(ChatCompletionChunk(id=request_id, created=created, model=model,
                                              choices=[], usage=usage).model_dump(), last=True)
    await events.end()   # the final output's chunks, the usage and [DONE]: one write


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
