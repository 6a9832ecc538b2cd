"""Anthropic's Messages API, as vLLM serves it: POST /v1/messages and
/v1/messages/count_tokens. Anthropic's clients (its SDKs, tools built on them) point their base
URL here. Errors take Anthropic's shape (`{"type": "error", "error": {"type", "message"}}`),
and the API key may come as x-api-key (app.py).

A request is one chat turn, rendered with the chat template (tools included) and generated as
one engine request. Its answer is content blocks: the thinking (with --reasoning-parser), the
text, then a tool_use block per call. stop_reason: end_turn, max_tokens, stop_sequence (with
stop_sequence set) or tool_use.

Streams are Anthropic's events: message_start, then each block's content_block_start,
content_block_delta (text_delta, thinking_delta, input_json_delta) and content_block_stop,
then message_delta (stop_reason, usage) and message_stop. Text and thinking stream as the
engine makes them; with tools, the chat stream's tool parser turns the text into text blocks
and tool_use blocks whose input streams in (with --reasoning-parser as well, those blocks come
once the output has ended).
"""

from __future__ import annotations

from typing import Optional

import orjson
from aiohttp import web

from aserve.server.app import STATE, ServerState, json_response, note_usage, read_request
from aserve.server.engine_requests import add_all, fill_max_tokens, last_output
from aserve.server.errors import APIError
from aserve.server.prompts import ChatTemplateOptions, chat_prompt_ids
from aserve.server.protocol_anthropic import MessagesRequest, chat_tools, tool_input
from aserve.server.random_ids import random_hex_id
from aserve.server.reasoning import ReasoningView
from aserve.server.streaming import open_stream, request_failed, stream_or_report
from aserve.server.structured_request import check_grammar
from aserve.server.tool_calls import (ToolPlan, calls_from_output, keep_special_tokens_for_parser, plan_tools,
                                      streamed_tool_deltas)


async def _prompt(state: ServerState, req: MessagesRequest, plan: ToolPlan) -> list[int]:
    """The conversation rendered with the chat template (with the tools) and tokenized."""
    options = ChatTemplateOptions(chat_template_kwargs=req.template_kwargs())
    return await chat_prompt_ids(state, req.conversation(), True, options, tools=plan.template_tools())


# ----------------------------------------------------------------------------- POST /v1/messages
async def create_message(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    req: MessagesRequest = await read_request(request, MessagesRequest)
    state.check_model(req.model)
    plan = req.tool_plan(state.tool_call_parser)
    params = req.to_sampling_params(plan, state.sampling_defaults)
    keep_special_tokens_for_parser(plan, params)
    message_id = f"msg_{random_hex_id()}"
    with state.admit():
        await check_grammar(state, params, "output_config" if req.output_config else "tool_choice")
        prompt_ids = await _prompt(state, req, plan)
        view = ReasoningView(state.reasoning, prompt_ids)
        if view.active:   # a forced call's constraint applies after the thinking
            params = state.reasoning.gate(params, prompt_ids)
        (stream,) = await add_all(state, message_id, [prompt_ids],
                                  lambda num_tokens: fill_max_tokens(state, params, num_tokens))
    try:
        if not req.stream:
            final = await last_output(stream)
            out = final.outputs[0]
            blocks, called = _blocks(plan, view, out.text)
            body = _message(req, state, message_id, blocks, _usage(final))
            body.update(_stop(out.finish_reason, out.stop_reason, called))
            note_usage(request, len(final.prompt_token_ids), len(out.token_ids))
            return json_response(body)
        response = await open_stream(request, "text/event-stream")
        events = _Events(response)
        await stream_or_report(request, response, _stream(request, state, req, plan, view, message_id,
                                                          len(prompt_ids), stream, events), events.send_error)
        return response
    finally:
        stream.close()  # aborts whatever has not finished: the client left, or something failed


def _blocks(plan: ToolPlan, view: ReasoningView, text: str) -> tuple[list[dict], bool]:
    """A finished output's content blocks, and whether it made tool calls."""
    reasoning, answer = view.final(text)
    content, calls = calls_from_output(plan, answer)
    blocks = [_thinking_block(reasoning)] if reasoning else []
    if content or not (calls or blocks):
        blocks.append({"type": "text", "text": content or ""})
    blocks += [_tool_use_block(call.name, tool_input(call.arguments)) for call in calls]
    return blocks, bool(calls)


def _thinking_block(text: str) -> dict:
    return {"type": "thinking", "thinking": text, "signature": ""}


def _tool_use_block(name: str, arguments) -> dict:
    return {"type": "tool_use", "id": f"toolu_{random_hex_id()[:24]}", "name": name, "input": arguments}


def _message(req: MessagesRequest, state: ServerState, message_id: str, content: list[dict],
             usage: dict) -> dict:
    return {"id": message_id, "type": "message", "role": "assistant",
            "model": req.model or state.served_model_name, "content": content, "stop_reason": None,
            "stop_sequence": None, "usage": usage}


def _usage(final) -> dict:
    return {"input_tokens": len(final.prompt_token_ids), "output_tokens": len(final.outputs[0].token_ids),
            "cache_read_input_tokens": final.num_cached_tokens or 0, "cache_creation_input_tokens": 0}


def _stop(finish_reason: Optional[str], stop_reason, called: bool) -> dict:
    """Anthropic's stop_reason (and stop_sequence) for the engine's finish."""
    if finish_reason == "length":
        return {"stop_reason": "max_tokens", "stop_sequence": None}
    if called:
        return {"stop_reason": "tool_use", "stop_sequence": None}
    if isinstance(stop_reason, str):
        return {"stop_reason": "stop_sequence", "stop_sequence": stop_reason}
    return {"stop_reason": "end_turn", "stop_sequence": None}


# ----------------------------------------------------------------------------- streaming
class _Events:
    """Anthropic's server-sent events: `event: <type>` and its body."""

    def __init__(self, response: web.StreamResponse) -> None:
        self._response = response

    async def send(self, kind: str, **fields) -> None:
        body = {"type": kind, **fields}
        await self._response.write(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n")

    async def send_error(self, _response, err: APIError) -> None:
        """The last event for a failure after the headers (streaming.stream_or_report's hook)."""
        await self._response.write(b"event: error\ndata: " + err.anthropic_body() + b"\n\n")

    async def end(self) -> None:
        await self._response.write_eof()


class _Block:
    """One streamed content block (thinking or text), from its start to its stop."""

    def __init__(self, events: _Events, index: int, kind: str) -> None:
        self.events, self.index, self.kind = events, index, kind

    async def start(self) -> None:
        empty = {"type": "thinking", "thinking": "", "signature": ""} if self.kind == "thinking" else {
            "type": "text", "text": ""}
        await self.events.send("content_block_start", index=self.index, content_block=empty)

    async def add(self, text: str) -> None:
        delta = ({"type": "thinking_delta", "thinking": text} if self.kind == "thinking"
                 else {"type": "text_delta", "text": text})
        await self.events.send("content_block_delta", index=self.index, delta=delta)

    async def stop(self) -> None:
        await self.events.send("content_block_stop", index=self.index)


async def _stream(request, state, req, plan, view, message_id, num_prompt_tokens, stream, events) -> None:
    start = _message(req, state, message_id, [], {"input_tokens": num_prompt_tokens, "output_tokens": 0})
    await events.send("message_start", message=start)
    if plan.mode == "none":
        final, called = await _stream_text(view, stream, events), False
    elif not view.active:
        final, called = await _stream_calls(plan, stream, events)
    else:   # thinking, then calls or text: sent once the text has ended
        final = await last_output(stream)
        blocks, called = _blocks(plan, view, final.outputs[0].text)
        for index, block in enumerate(blocks):
            await _send_whole_block(events, index, block)
    out = final.outputs[0]
    note_usage(request, len(final.prompt_token_ids), len(out.token_ids))
    await events.send("message_delta", delta=_stop(out.finish_reason, out.stop_reason, called),
                      usage={"output_tokens": len(out.token_ids)})
    await events.send("message_stop")
    await events.end()


async def _stream_text(view: ReasoningView, stream, events: _Events):
    """The thinking (with --reasoning-parser) and the text, block by block, delta by delta."""
    blocks: list[_Block] = []
    sent_len, final = 0, None

    async def block(kind: str) -> _Block:
        if not blocks or blocks[-1].kind != kind:
            if blocks:
                await blocks[-1].stop()
            blocks.append(_Block(events, len(blocks), kind))
            await blocks[-1].start()
        return blocks[-1]

    async for final in stream:
        if final.error:
            raise request_failed(final.error)
        out = final.outputs[0]
        if view.active:
            reasoning, text = view.step(0, out.text, out.finish_reason is not None)
            if reasoning:
                await (await block("thinking")).add(reasoning)
        else:
            text, sent_len = out.text[sent_len:], len(out.text)
        if text:
            await (await block("text")).add(text)
    if not blocks:
        await block("text")   # no text at all: an empty text block, as the unstreamed answer has
    await blocks[-1].stop()
    return final


async def _stream_calls(plan: ToolPlan, stream, events: _Events):
    """With tools: the chat stream's tool parser turns the text into answer text and calls as it
    comes; one block after another, a text block or a tool_use block whose input arrives as
    input_json_delta pieces. Returns the final output and whether it made calls."""
    index, open_kind, calls_seen, final = -1, None, set(), None

    async def start(kind: str, content_block: dict) -> None:
        nonlocal index, open_kind
        if open_kind is not None:
            await events.send("content_block_stop", index=index)
        index, open_kind = index + 1, kind
        await events.send("content_block_start", index=index, content_block=content_block)

    async for final, delta in streamed_tool_deltas(plan, stream):
        if delta.content:
            if open_kind != "text":
                await start("text", {"type": "text", "text": ""})
            await events.send("content_block_delta", index=index,
                              delta={"type": "text_delta", "text": delta.content})
        for fragment in delta.tool_calls:
            if fragment["index"] not in calls_seen:   # a new call (parsers send calls in order)
                calls_seen.add(fragment["index"])
                await start("tool_use", {**_tool_use_block(fragment["function"]["name"], {}), "input": {}})
            arguments = fragment["function"].get("arguments")
            if arguments:
                await events.send("content_block_delta", index=index,
                                  delta={"type": "input_json_delta", "partial_json": arguments})
    if open_kind is None:   # nothing at all: an empty text block, as the unstreamed answer has
        await start("text", {"type": "text", "text": ""})
    await events.send("content_block_stop", index=index)
    return final, bool(calls_seen)


async def _send_whole_block(events: _Events, index: int, block: dict) -> None:
    """A finished content block's events, from its start to its stop."""
    if block["type"] == "tool_use":
        await events.send("content_block_start", index=index, content_block={**block, "input": {}})
        await events.send("content_block_delta", index=index, delta={
            "type": "input_json_delta", "partial_json": orjson.dumps(block["input"]).decode()})
        await events.send("content_block_stop", index=index)
        return
    streamed = _Block(events, index, block["type"])
    await streamed.start()
    await streamed.add(block["thinking"] if block["type"] == "thinking" else block["text"])
    await streamed.stop()


# ----------------------------------------------------------------------------- count_tokens
async def count_tokens(request: web.Request) -> web.Response:
    """The prompt's tokens, as the chat template renders the messages, system and tools."""
    state: ServerState = request.app[STATE]
    req = await read_request(request, _CountRequest)
    state.check_model(req.model)
    # The tools as the template sees them, whatever tool_choice (nothing is generated here).
    plan = plan_tools(chat_tools(req.tools), "none", None)
    return json_response({"input_tokens": len(await _prompt(state, req, plan))})


class _CountRequest(MessagesRequest):
    max_tokens: int = 1   # count_tokens takes no max_tokens


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", create_message)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
