"""OpenAI's Responses API: POST /v1/responses, and for stored responses GET and DELETE
/v1/responses/{id}, POST /v1/responses/{id}/cancel and GET /v1/responses/{id}/input_items.

A request is one chat turn: its instructions (a system message), the stored conversation of
previous_response_id with that response's output, then its input items, rendered with the
chat template (tools included) and generated as one engine request. Streams: responses_stream.py.

background=true (needs the store) runs the response in a task of its own, which GET polls and
cancel ends (aborting the engine request). Unstreamed, the request answers at once with status
"queued"; streamed, the run writes its events into a log that the request follows, and that
GET ?stream=true&starting_after=N follows from any point, also after the client that created
it has left (as OpenAI's and vLLM's background streams).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from aiohttp import web

from aserve.server.access_log import CLIENT_GONE
from aserve.server.app import STATE, ServerState, json_response, note_usage, read_request
from aserve.server.engine_requests import add_all, fill_max_tokens, last_output
from aserve.server.errors import APIError, api_error_from
from aserve.server.prompts import ChatTemplateOptions, chat_prompt_ids
from aserve.server.protocol_responses import ResponsesRequest, input_items, items_as_messages
from aserve.server.reasoning import ReasoningView
from aserve.server.responses_output import ResponseTurn, output_items, status_of, usage_of
from aserve.server.responses_store import EventLog, ResponseStore, StoredResponse
from aserve.server.responses_stream import ResponseEvents, stream_response
from aserve.server.streaming import open_stream, stream_or_report
from aserve.server.structured_request import check_grammar
from aserve.server.tool_calls import keep_special_tokens_for_parser

logger = logging.getLogger("aserve.server")


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
    params = req.to_sampling_params(plan, state.sampling_defaults)
    keep_special_tokens_for_parser(plan, params)
    turn = ResponseTurn(state, req, plan, stored=req.store is not False and store.enabled,   # null: the default
                        params=params)
    with state.admit():
        await check_grammar(state, params, req.constraint_param())
        prompt_ids = await chat_prompt_ids(state, conversation, True,
                                           ChatTemplateOptions(truncate_prompt_tokens=_keep_tokens(state, req)),
                                           tools=plan.template_tools())
        turn.view = ReasoningView(state.reasoning, prompt_ids)
        if turn.view.active:   # a constraint applies to the answer, after the thinking
            params = state.reasoning.gate(params, prompt_ids)
        (stream,) = await add_all(state, turn.response_id, [prompt_ids],
                                  lambda num_tokens: fill_max_tokens(state, params, num_tokens))
    entry = StoredResponse(turn.body("queued", []), items, messages)
    if req.background:
        return await _start_in_background(request, turn, stream, entry)

    def finished(body: dict) -> None:
        entry.body = body
        if turn.stored:
            store.put(turn.response_id, entry)
        note_usage(request, body["usage"]["input_tokens"], body["usage"]["output_tokens"])

    try:
        if not req.stream:
            final = await last_output(stream)
            finished(turn.body(status_of(final.outputs[0].finish_reason),
                               await output_items(state, req, plan, final.outputs[0], turn.view),
                               usage_of(final, turn.view)))
            return json_response(entry.body)
        response = await open_stream(request, "text/event-stream")
        events = ResponseEvents(response.write, response.write_eof)
        await stream_or_report(request, response, stream_response(turn, stream, events, finished),
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


# ----------------------------------------------------------------------------- background
async def _start_in_background(request: web.Request, turn: ResponseTurn, stream,
                               entry: StoredResponse) -> web.StreamResponse:
    store = turn.state.responses
    store.put(turn.response_id, entry)
    if turn.req.stream:
        entry.events = EventLog()
        run = _stream_in_background(turn, stream, entry)
    else:
        run = _run_in_background(turn, stream, entry)
    task = store.run_in_background(entry, run, name=f"aserve-{turn.response_id}")
    task.add_done_callback(lambda _: _background_ended(store, entry, stream))
    if entry.events is None:
        return json_response(entry.body)
    return await _follow(request, entry.events, -1)


async def _run_in_background(turn: ResponseTurn, stream, entry: StoredResponse) -> None:
    entry.body = {**entry.body, "status": "in_progress"}
    try:
        final = await last_output(stream)
        entry.body = turn.body(status_of(final.outputs[0].finish_reason),
                               await output_items(turn.state, turn.req, turn.plan, final.outputs[0], turn.view),
                               usage_of(final, turn.view))
    except Exception as exc:
        _failed(turn, entry, exc)


async def _stream_in_background(turn: ResponseTurn, stream, entry: StoredResponse) -> None:
    entry.body = {**entry.body, "status": "in_progress"}
    events = ResponseEvents(entry.events.write, entry.events.end)
    try:
        await stream_response(turn, stream, events, lambda body: setattr(entry, "body", body))
    except Exception as exc:
        await events.send_error(None, _failed(turn, entry, exc))


def _failed(turn: ResponseTurn, entry: StoredResponse, exc: Exception) -> APIError:
    err = api_error_from(exc)
    if err is None:
        logger.error("background response %s failed", turn.response_id, exc_info=exc)
        err = APIError(500, f"Internal server error: {exc!r}", type="server_error")
    entry.body = {**entry.body, "status": "failed", "error": {"code": err.code or err.type, "message": err.message}}
    return err


def _background_ended(store: ResponseStore, entry: StoredResponse, stream) -> None:
    """A background run's end, however it came (a cancel may come before its first line
    runs): its engine request aborted if unfinished, "cancelled" if it had not ended, and its
    event log closed for its readers."""
    stream.close()
    entry.task = None
    if entry.body["status"] in ("queued", "in_progress"):
        entry.body = {**entry.body, "status": "cancelled"}
    if entry.events is not None:
        entry.events.close()
        store.trim_event_logs()


async def _follow(request: web.Request, events: EventLog, starting_after: int) -> web.StreamResponse:
    """A background response's events to this client, from starting_after on. A client that
    leaves ends only its own reading: the run goes on."""
    response = await open_stream(request, "text/event-stream")
    try:
        await events.follow(response.write, starting_after)
        await response.write_eof()
    except ConnectionError:
        request[CLIENT_GONE] = True
    return response


# ----------------------------------------------------------------------------- stored responses
def _stored(request: web.Request) -> StoredResponse:
    response_id = request.match_info["response_id"]
    entry = request.app[STATE].responses.get(response_id)
    if entry is None:
        raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id")
    return entry


async def retrieve_response(request: web.Request) -> web.StreamResponse:
    """The stored response; with ?stream=true (a background stream's), its events after
    starting_after (default: all of them)."""
    entry = _stored(request)
    if request.query.get("stream", "false").lower() != "true":
        return json_response(entry.body)
    if entry.events is None:
        raise APIError(400, "only a response created with background and stream can be streamed again "
                            "(and the events of old ones are not kept: GET it without stream).", param="stream")
    try:
        starting_after = int(request.query.get("starting_after", "-1"))
    except ValueError:
        starting_after = None
    if starting_after is None or starting_after < -1:
        raise APIError(400, f"starting_after must be an event's sequence_number, got "
                            f"{request.query.get('starting_after')!r}.", param="starting_after")
    return await _follow(request, entry.events, starting_after)


async def delete_response(request: web.Request) -> web.Response:
    entry = _stored(request)
    if entry.task is not None:
        entry.task.cancel()
    request.app[STATE].responses.delete(entry.body["id"])
    return json_response({"id": entry.body["id"], "object": "response", "deleted": True})


async def cancel_response(request: web.Request) -> web.Response:
    entry = _stored(request)
    if not entry.body["background"]:
        raise APIError(400, "Cannot cancel a synchronous response: only responses created with "
                            "background=true can be cancelled.", param="response_id")
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


def routes() -> tuple:
    """(method, path, handler) of each route (responses_proxy.py passes the same paths on)."""
    return (("POST", "/v1/responses", create_response),
            ("GET", "/v1/responses/{response_id}", retrieve_response),
            ("DELETE", "/v1/responses/{response_id}", delete_response),
            ("POST", "/v1/responses/{response_id}/cancel", cancel_response),
            ("GET", "/v1/responses/{response_id}/input_items", list_input_items))


def add_routes(app: web.Application) -> None:
    for method, path, handler in routes():
        app.router.add_route(method, path, handler)
