"""The events of a streamed /v1/responses answer (OpenAI's typed server-sent events, numbered
by sequence_number), written to the client as they come, or into an EventLog that a
background response keeps for its readers (the request that created it, and GET
/v1/responses/{id}?stream=true&starting_after=N).

Order: response.created, response.in_progress, the message's output_item.added and
content_part.added, an output_text.delta per engine step that brought tokens (empty text while
a character is incomplete, as the chat stream does), then output_text.done, content_part.done,
output_item.done and response.completed (or response.incomplete when max_output_tokens cut it
off). With tools the text is only known to be calls or content once it has ended, so those
items' events all come at the end. An error after the headers is an "error" event.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import orjson

from aserve.server.chunk_sink import ChoiceProgress
from aserve.server.engine_requests import last_output
from aserve.server.errors import APIError
from aserve.server.protocol_responses import new_item_id
from aserve.server.responses_output import (ResponseTurn, message_item, output_items, response_logprobs,
                                            status_of, text_part, usage_of)
from aserve.server.streaming import request_failed


class ResponseEvents:
    """One response's events, numbered in order, handed to write(bytes); end() closes them."""

    def __init__(self, write: Callable[[bytes], Awaitable[None]], end: Callable[[], Awaitable[None]]) -> None:
        self._write, self._end = write, end
        self._sequence = 0

    async def send(self, kind: str, **fields) -> None:
        body = {"type": kind, **fields, "sequence_number": self._sequence}
        self._sequence += 1
        await self._write(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n")

    async def send_error(self, _response, err: APIError) -> None:
        """The last event for a failure after the headers (streaming.stream_or_report's hook)."""
        await self.send("error", code=err.code or err.type, message=err.message, param=err.param)

    async def end(self) -> None:
        await self._end()


class EventLog:
    """A background response's events, kept for whoever reads them, from any point on: an
    event's index is its sequence_number."""

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.num_bytes = 0
        self.ended = False
        self._changed = asyncio.Event()

    async def write(self, event: bytes) -> None:
        self.events.append(event)
        self.num_bytes += len(event)
        self._wake()

    async def end(self) -> None:
        self.close()

    def close(self) -> None:
        """No more events (also when the run was cancelled before it wrote its last)."""
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()   # the next wait waits for the next change

    async def follow(self, write: Callable[[bytes], Awaitable[None]], starting_after: int = -1) -> None:
        """write() every event after the index starting_after, as they come, until the end."""
        index = starting_after + 1
        while True:
            while index < len(self.events):
                await write(self.events[index])
                index += 1
            if self.ended:
                return
            await self._changed.wait()


async def stream_response(turn: ResponseTurn, stream, events: ResponseEvents,
                          finished: Callable[[dict], None]) -> None:
    """Every event of one response; finished(body) gets the final response object before the
    last event goes out (so a client that chains on it finds it stored)."""
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
    body = turn.body(status, output, usage_of(final))
    finished(body)
    await events.send(f"response.{status}", response=body)
    await events.end()


async def _stream_text(turn: ResponseTurn, stream, events: ResponseEvents):
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


async def _send_whole_item(events: ResponseEvents, index: int, item: dict) -> None:
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
