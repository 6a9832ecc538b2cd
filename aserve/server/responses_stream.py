"""The events of a streamed /v1/responses answer (OpenAI's typed server-sent events, numbered
by sequence_number), written to the client as they come, or into the EventLog
(responses_store.py) that a background response keeps for its readers (the request that
created it, and GET /v1/responses/{id}?stream=true&starting_after=N).

Order: response.created, response.in_progress, the message's output_item.added and
content_part.added, an output_text.delta per engine step that brought tokens (empty text while
a character is incomplete, as the chat stream does), then output_text.done, content_part.done,
output_item.done and response.completed (or response.incomplete when max_output_tokens cut it
off). With tools, the chat stream's tool parser turns the text into answer text and calls as it
comes: a message item, and a function_call item per call whose arguments stream in, one item
after another. With tools and --reasoning-parser together, the items' events come once the
output has ended. An error after the headers is an "error" event.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Optional

import orjson

from aserve.server.chunk_sink import ChoiceProgress
from aserve.server.engine_requests import last_output
from aserve.server.errors import APIError
from aserve.server.protocol_responses import new_item_id
from aserve.server.responses_output import (ResponseTurn, function_call_item, message_item, output_items,
                                            reasoning_item, reasoning_part, response_logprobs, status_of,
                                            text_part, usage_of)
from aserve.server.streaming import request_failed
from aserve.server.tool_calls import streamed_tool_deltas


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


async def stream_response(turn: ResponseTurn, stream, events: ResponseEvents,
                          finished: Callable[[dict], None]) -> None:
    """Every event of one response; finished(body) gets the final response object before the
    last event goes out (so a client that chains on it finds it stored)."""
    await events.send("response.created", response=turn.body("in_progress", []))
    await events.send("response.in_progress", response=turn.body("in_progress", []))
    if turn.plan.mode == "none" and turn.view.active:
        final, output = await _stream_thinking_and_text(turn, stream, events)
    elif turn.plan.mode == "none":
        final, output = await _stream_text(turn, stream, events)
    elif not turn.view.active:
        final, output = await _stream_calls(turn, stream, events)
    else:   # thinking, then calls or content: sent once the text has ended
        final = await last_output(stream)
        output = await output_items(turn.state, turn.req, turn.plan, final.outputs[0], turn.view)
        for index, item in enumerate(output):
            await _send_whole_item(events, index, item)
    status = status_of(final.outputs[0].finish_reason)
    body = turn.body(status, output, usage_of(final, turn.view))
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


class _TextItem:
    """One streamed item of text (the thinking: a reasoning item; the answer: a message), from
    its output_item.added to its output_item.done."""

    def __init__(self, events: ResponseEvents, kind: str, output_index: int) -> None:
        self.events, self.kind, self.output_index = events, kind, output_index
        self.id = new_item_id("rs" if kind == "reasoning" else "msg")
        self.text = ""
        self._where = {"item_id": self.id, "output_index": output_index, "content_index": 0}

    def _part(self, text: str) -> dict:
        return reasoning_part(text) if self.kind == "reasoning" else text_part(text)

    def _item(self, status: str, parts: list[dict]) -> dict:
        if self.kind == "reasoning":
            return reasoning_item(self.id, status, parts)
        return message_item(self.id, status, parts)

    async def open(self) -> None:
        await self.events.send("response.output_item.added", output_index=self.output_index,
                               item=self._item("in_progress", []))
        await self.events.send("response.content_part.added", **self._where, part=self._part(""))

    async def add(self, delta: str) -> None:
        self.text += delta
        kind = "reasoning_text" if self.kind == "reasoning" else "output_text"
        extra = {} if self.kind == "reasoning" else {"logprobs": []}
        await self.events.send(f"response.{kind}.delta", **self._where, delta=delta, **extra)

    async def close(self, status: str) -> dict:
        part = self._part(self.text)
        kind = "reasoning_text" if self.kind == "reasoning" else "output_text"
        extra = {} if self.kind == "reasoning" else {"logprobs": []}
        await self.events.send(f"response.{kind}.done", **self._where, text=self.text, **extra)
        await self.events.send("response.content_part.done", **self._where, part=part)
        item = self._item(status, [part])
        await self.events.send("response.output_item.done", output_index=self.output_index, item=item)
        return item


async def _stream_thinking_and_text(turn: ResponseTurn, stream, events: ResponseEvents):
    """With --reasoning-parser: the thinking as a reasoning item, delta by delta, closed when the
    answer starts; then the answer as a message. Returns the final output and the items."""
    thinking: Optional[_TextItem] = None
    answer: Optional[_TextItem] = None
    closed: list[dict] = []
    final = None
    async for final in stream:
        if final.error:
            raise request_failed(final.error)
        out = final.outputs[0]
        reasoning, content = turn.view.step(0, out.text, out.finish_reason is not None)
        if reasoning:
            if thinking is None:
                thinking = _TextItem(events, "reasoning", 0)
                await thinking.open()
            await thinking.add(reasoning)
        if content:
            if answer is None:
                if thinking is not None:
                    closed.append(await thinking.close("completed"))
                answer = _TextItem(events, "message", len(closed))
                await answer.open()
            await answer.add(content)
    status = status_of(final.outputs[0].finish_reason)
    if answer is None and thinking is not None:   # all of it thinking: cut off, or no answer
        closed.append(await thinking.close(status))
    elif answer is None:   # no text at all: an empty message, as without a parser
        answer = _TextItem(events, "message", 0)
        await answer.open()
    if answer is not None:
        closed.append(await answer.close(status))
    return final, closed


class _CallItem:
    """One streamed function_call item: its arguments as the tool parser finds them."""

    def __init__(self, events: ResponseEvents, output_index: int, name: str) -> None:
        self.events, self.output_index = events, output_index
        self.item = function_call_item(name, "", status="in_progress")

    async def open(self) -> None:
        await self.events.send("response.output_item.added", output_index=self.output_index, item=dict(self.item))

    async def add(self, arguments: str) -> None:
        if arguments:
            self.item["arguments"] += arguments
            await self.events.send("response.function_call_arguments.delta", item_id=self.item["id"],
                                   output_index=self.output_index, delta=arguments)

    async def close(self, status: str) -> dict:
        item = {**self.item, "status": status}
        await self.events.send("response.function_call_arguments.done", item_id=item["id"],
                               output_index=self.output_index, name=item["name"], arguments=item["arguments"])
        await self.events.send("response.output_item.done", output_index=self.output_index, item=item)
        return item


async def _stream_calls(turn: ResponseTurn, stream, events: ResponseEvents):
    """With tools: the tool parser's pieces as they come (the chat stream's parser), one item at
    a time: answer text as a message, each call as a function_call item whose arguments stream
    in. Returns the final output and the items."""
    done: list[dict] = []
    current = None   # the open item: a _TextItem (message) or a _CallItem
    calls_seen: set[int] = set()
    final = None

    async def switch_to(make) -> None:
        """Close the open item, then open make(its output index)."""
        nonlocal current
        if current is not None:
            done.append(await current.close("completed"))
        current = make(len(done))
        await current.open()

    async for final, delta in streamed_tool_deltas(turn.plan, stream):
        if delta.content:
            if not isinstance(current, _TextItem):
                await switch_to(lambda index: _TextItem(events, "message", index))
            await current.add(delta.content)
        for fragment in delta.tool_calls:
            if fragment["index"] not in calls_seen:   # a new call (parsers send calls in order)
                calls_seen.add(fragment["index"])
                name = fragment["function"]["name"]
                await switch_to(lambda index: _CallItem(events, index, name))
            await current.add(fragment["function"].get("arguments") or "")
    if current is None:   # nothing at all: an empty message, as unstreamed
        await switch_to(lambda index: _TextItem(events, "message", index))
    done.append(await current.close(status_of(final.outputs[0].finish_reason)))
    return final, done


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
