"""OpenAI's Responses API: POST /v1/responses, and for stored responses GET and DELETE
/v1/responses/{id}, POST /v1/responses/{id}/cancel and GET /v1/responses/{id}/input_items.

A request is one chat turn: its instructions (a system message), the stored conversation of
previous_response_id with that response's output, then its input items, rendered with the
chat template (tools included) and generated as one engine request.

Streams are OpenAI's typed server-sent events, numbered by sequence_number: response.created,
response.in_progress, the message's output_item.added and content_part.added, an
output_text.delta per engine step that brought tokens (empty text while a character is
incomplete, as the chat stream does), then output_text.done, content_part.done,
output_item.done and response.completed (or response.incomplete when max_output_tokens cut it
off). With tools the text is only known to be calls or content once it has ended, so those
items' events all come at the end. An error after the headers is an "error" event.

background=true (needs the store) answers at once with status "queued"; the response runs in
a task of its own, which GET polls and cancel ends (aborting the engine request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

import orjson
from aiohttp import web

from aserve.server.app import STATE, ServerState, json_response, note_usage, read_request
from aserve.server.chunk_sink import ChoiceProgress
from aserve.server.engine_requests import add_all, fill_max_tokens, last_output
from aserve.server.errors import APIError, api_error_from
from aserve.server.prompts import ChatTemplateOptions, chat_prompt_ids
from aserve.server.protocol_responses import ResponsesRequest, input_items, items_as_messages, new_item_id
from aserve.server.responses_output import (message_item, output_items, response_logprobs, response_object,
                                            status_of, text_part, usage_of)
from aserve.server.responses_store import StoredResponse
from aserve.server.streaming import open_stream, request_failed, stream_or_report
from aserve.server.structured_request import check_grammar

logger = logging.getLogger("aserve.server")


class _Turn:
    """One request's identity and what it was asked: enough to build its response object."""

    def __init__(self, state: ServerState, req: ResponsesRequest, plan, stored: bool) -> None:
        self.state, self.req, self.plan, self.stored = state, req, plan, stored
        self.response_id = req.response_id()
        self.created_at = int(time.time())

    def body(self, status: str, output: list[dict], usage: Optional[dict] = None,
             error: Optional[dict] = None) -> dict:
        return response_object(self.req, self.response_id, self.state.served_model_name, self.created_at,
                               status, output, usage, error, store=self.stored)


# ----------------------------------------------------------------------------- POST /v1/responses
async def create_response(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    req: ResponsesRequest = await read_request(request, ResponsesRequest)
    state.check_model(req.model)
    req.check()
    store = state.responses
    if req.background and not store.enabled:
        raise APIError(400, "background responses need the response store, which this server runs "
                            "without (--max-stored-responses 0).", param="background")
    previous = _previous(state, req.previous_response_id)
    items = input_items(req.input)
    messages = (previous.messages + items_as_messages(previous.body["output"]) if previous else [])
    messages += items_as_messages(items)
    conversation = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + messages
    plan = req.tool_plan(state.tool_call_parser)
    params = req.to_sampling_params(plan)
    turn = _Turn(state, req, plan, stored=req.store is not False and store.enabled)   # null: the default
    with state.admit():
        await check_grammar(state, params, req.constraint_param())
        prompt_ids = await chat_prompt_ids(state, conversation, True,
                                           ChatTemplateOptions(truncate_prompt_tokens=_keep_tokens(state, req)),
                                           tools=plan.template_tools())
        (stream,) = await add_all(state, turn.response_id, [prompt_ids],
                                  lambda num_tokens: fill_max_tokens(state, params, num_tokens))
    entry = StoredResponse(turn.body("queued", []), items, messages)
    if req.background:
        store.put(turn.response_id, entry)
        task = store.run_in_background(entry, _run_in_background(turn, stream, entry),
                                       name=f"aserve-{turn.response_id}")
        task.add_done_callback(lambda _: _background_ended(entry, stream))
        return json_response(entry.body)
    try:
        if not req.stream:
            final = await last_output(stream)
            entry.body = turn.body(status_of(final.outputs[0].finish_reason),
                                   await output_items(state, req, plan, final.outputs[0]), usage_of(final))
            _finish(request, turn, entry)
            return json_response(entry.body)
        response = await open_stream(request, "text/event-stream")
        events = _Events(response)
        await stream_or_report(request, response, _stream(request, turn, stream, entry, events),
                               events.send_error)
        return response
    finally:
        stream.close()  # aborts whatever has not finished: the client left, or something failed


def _previous(state: ServerState, response_id: Optional[str]) -> Optional[StoredResponse]:
    if response_id is None:
        return None
    previous = state.responses.get(response_id)
    if previous is None:
        raise APIError(404, f"Previous response with id '{response_id}' not found.",
                       param="previous_response_id")
    if previous.body["status"] in ("queued", "in_progress"):
        raise APIError(400, f"Previous response with id '{response_id}' is still {previous.body['status']}.",
                       param="previous_response_id")
    return previous


def _keep_tokens(state: ServerState, req: ResponsesRequest) -> Optional[int]:
    """truncation "auto": keep the prompt's last tokens, leaving room for max_output_tokens
    (at least one); "disabled": a prompt that does not fit is a 400."""
    if req.truncation != "auto":
        return None
    room = min(max(req.max_output_tokens or 1, 1), state.max_model_len - 1)
    return state.max_model_len - room


def _finish(request: web.Request, turn: _Turn, entry: StoredResponse) -> None:
    if turn.stored:
        turn.state.responses.put(turn.response_id, entry)
    usage = entry.body["usage"] or {}
    note_usage(request, usage.get("input_tokens", 0), usage.get("output_tokens", 0))


# ----------------------------------------------------------------------------- streaming
class _Events:
    """OpenAI's typed SSE events of one response, numbered in order."""

    def __init__(self, response: web.StreamResponse) -> None:
        self._response = response
        self._sequence = 0

    async def send(self, kind: str, **fields) -> None:
        body = {"type": kind, **fields, "sequence_number": self._sequence}
        self._sequence += 1
        await self._response.write(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n")

    async def send_error(self, response: web.StreamResponse, err: APIError) -> None:
        """The stream's last event for a failure after the headers (stream_or_report)."""
        await self.send("error", code=err.code or err.type, message=err.message, param=err.param)

    async def end(self) -> None:
        await self._response.write_eof()


async def _stream(request: web.Request, turn: _Turn, stream, entry: StoredResponse, events: _Events) -> None:
    await events.send("response.created", response=turn.body("in_progress", []))
    await events.send("response.in_progress", response=turn.body("in_progress", []))
    if turn.plan.mode == "none":
        final, output = await _stream_text(turn, stream, events)
    else:   # calls or content: known once the text has ended
        final = await last_output(stream)
        output = await output_items(turn.state, turn.req, turn.plan, final.outputs[0])
        for index, item in enumerate(output):
            await _send_whole_item(events, index, item)
    status = status_of(final.outputs[0].finish_reason)
    entry.body = turn.body(status, output, usage_of(final))
    _finish(request, turn, entry)
    await events.send(f"response.{status}", response=entry.body)
    await events.end()


async def _stream_text(turn: _Turn, stream, events: _Events):
    """The message's events, its text delta by delta; returns the final output and the items."""
    state, req = turn.state, turn.req
    item_id = new_item_id("msg")
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    await events.send("response.output_item.added", output_index=0, item=message_item(item_id, "in_progress", []))
    await events.send("response.content_part.added", **where, part=text_part(""))
    sent, logprobs, final = ChoiceProgress(), [], None
    async for final in stream:
        if final.error:
            raise request_failed(final.error)
        out = final.outputs[0]
        new_ids = out.token_ids[sent.num_tokens:]
        if not new_ids:
            continue
        delta_lps = await response_logprobs(state, req, new_ids, (out.logprobs or [])[sent.num_tokens:])
        logprobs += delta_lps
        text = out.text[sent.text_len:]
        sent.text_len, sent.num_tokens = len(out.text), len(out.token_ids)
        await events.send("response.output_text.delta", **where, delta=text, logprobs=delta_lps)
    out = final.outputs[0]
    part = text_part(out.text, logprobs)
    await events.send("response.output_text.done", **where, text=out.text, logprobs=logprobs)
    await events.send("response.content_part.done", **where, part=part)
    item = message_item(item_id, status_of(out.finish_reason), [part])
    await events.send("response.output_item.done", output_index=0, item=item)
    return final, [item]


async def _send_whole_item(events: _Events, index: int, item: dict) -> None:
    """A finished output item's events, from added to done."""
    if item["type"] == "message":
        part = item["content"][0]
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        await events.send("response.output_item.added", output_index=index,
                          item=message_item(item["id"], "in_progress", []))
        await events.send("response.content_part.added", **where, part=text_part(""))
        await events.send("response.output_text.delta", **where, delta=part["text"], logprobs=part["logprobs"])
        await events.send("response.output_text.done", **where, text=part["text"], logprobs=part["logprobs"])
        await events.send("response.content_part.done", **where, part=part)
    else:
        await events.send("response.output_item.added", output_index=index,
                          item={**item, "arguments": "", "status": "in_progress"})
        await events.send("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                          delta=item["arguments"])
        await events.send("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                          name=item["name"], arguments=item["arguments"])
    await events.send("response.output_item.done", output_index=index, item=item)


# ----------------------------------------------------------------------------- background
async def _run_in_background(turn: _Turn, stream, entry: StoredResponse) -> None:
    entry.body = {**entry.body, "status": "in_progress"}
    try:
        final = await last_output(stream)
        entry.body = turn.body(status_of(final.outputs[0].finish_reason),
                               await output_items(turn.state, turn.req, turn.plan, final.outputs[0]),
                               usage_of(final))
    except Exception as exc:
        err = api_error_from(exc)
        if err is None:
            logger.error("background response %s failed", turn.response_id, exc_info=exc)
            err = APIError(500, f"Internal server error: {exc!r}", type="server_error")
        entry.body = {**entry.body, "status": "failed",
                      "error": {"code": err.code or err.type, "message": err.message}}


def _background_ended(entry: StoredResponse, stream) -> None:
    """A background run's end, however it came (a cancel may come before its first line
    runs): its engine request aborted if unfinished, "cancelled" if it had not ended."""
    stream.close()
    entry.task = None
    if entry.body["status"] in ("queued", "in_progress"):
        entry.body = {**entry.body, "status": "cancelled"}


# ----------------------------------------------------------------------------- stored responses
def _stored(request: web.Request) -> StoredResponse:
    response_id = request.match_info["response_id"]
    entry = request.app[STATE].responses.get(response_id)
    if entry is None:
        raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id")
    return entry


async def retrieve_response(request: web.Request) -> web.Response:
    entry = _stored(request)
    if request.query.get("stream", "false").lower() == "true":
        raise APIError(400, "streaming a stored response is not supported by this server; GET it "
                            "without stream.", param="stream")
    return json_response(entry.body)


async def delete_response(request: web.Request) -> web.Response:
    entry = _stored(request)
    if entry.task is not None:
        entry.task.cancel()
    request.app[STATE].responses.delete(entry.body["id"])
    return json_response({"id": entry.body["id"], "object": "response", "deleted": True})


async def cancel_response(request: web.Request) -> web.Response:
    entry = _stored(request)
    if not entry.body["background"]:
        raise APIError(400, "Only responses created with background=true can be cancelled.",
                       param="response_id")
    task = entry.task
    if task is not None:
        task.cancel()
        # Its end (_background_ended, a callback that runs before this wait returns) aborts the
        # engine request and writes "cancelled".
        await asyncio.gather(task, return_exceptions=True)
    return json_response(entry.body)


async def list_input_items(request: web.Request) -> web.Response:
    """OpenAI's list of a response's input items: newest first unless order=asc, `limit`
    (1-100, default 20) after the item id `after`."""
    items = list(_stored(request).input_items)
    query = request.query
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, f"order must be asc or desc, got {order!r}.", param="order")
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise APIError(400, f"limit must be an integer from 1 to 100, got {query.get('limit')!r}.", param="limit")
    if order == "desc":
        items.reverse()
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise APIError(400, f"after: no input item {after!r} in this response.", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                          "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{response_id}", retrieve_response)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)
    app.router.add_post("/v1/responses/{response_id}/cancel", cancel_response)
    app.router.add_get("/v1/responses/{response_id}/input_items", list_input_items)
