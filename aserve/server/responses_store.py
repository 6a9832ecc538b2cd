"""Stored responses of /v1/responses (store=true, OpenAI's default): what GET, DELETE,
cancel, input_items and previous_response_id read.

In memory and bounded: past max_responses the oldest response is forgotten (vLLM's store,
behind VLLM_ENABLE_RESPONSES_API_STORE, grows without bound). max_responses 0 turns the store
off: store=true is then ignored, as vLLM ignores it by default, and a background response is
refused (it can only be read from the store).

A background stream's events are kept for readers that come back (GET ?stream=true). They take
far more room than the response itself (an event per token), so past MAX_EVENT_BYTES in all the
oldest finished streams' events are dropped: those responses can still be read whole, only
not streamed again.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Coroutine, Optional

DEFAULT_MAX_STORED_RESPONSES = 1000
MAX_EVENT_BYTES = 256 << 20


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


@dataclass
class StoredResponse:
    body: dict                 # the response object, as GET returns it
    input_items: list[dict]    # this request's input items, ids and all
    # The conversation this response answered, without its instructions (a chained request
    # brings its own, as OpenAI's): the earlier turns' messages and this request's input.
    messages: list[dict] = field(default_factory=list)
    task: Optional[asyncio.Task] = None   # a background response's run
    events: Optional[EventLog] = None     # a background stream's events, for its readers


class ResponseStore:
    def __init__(self, max_responses: int = DEFAULT_MAX_STORED_RESPONSES,
                 max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        if max_responses < 0:
            raise ValueError(f"max_stored_responses must be at least 0, got {max_responses}.")
        self.max_responses = max_responses
        self.max_event_bytes = max_event_bytes
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()
        # Background runs, held here until they end: the loop keeps only weak references to
        # tasks, and a stored response forgotten (or deleted) while it runs must still finish.
        self._running: set[asyncio.Task] = set()

    @property
    def enabled(self) -> bool:
        return self.max_responses > 0

    def __len__(self) -> int:
        return len(self._responses)

    def put(self, response_id: str, stored: StoredResponse) -> None:
        if not self.enabled:
            return
        self._responses[response_id] = stored
        self._responses.move_to_end(response_id)
        while len(self._responses) > self.max_responses:
            self._responses.popitem(last=False)

    def run_in_background(self, stored: StoredResponse, run: Coroutine, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(run, name=name)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        stored.task = task
        return task

    def trim_event_logs(self) -> None:
        """Drop the oldest finished streams' events while all kept events pass the bound."""
        logs = [entry for entry in self._responses.values() if entry.events is not None]
        total = sum(entry.events.num_bytes for entry in logs)
        for entry in logs:
            if total <= self.max_event_bytes:
                return
            if entry.events.ended:
                total -= entry.events.num_bytes
                entry.events = None

    def get(self, response_id: str) -> Optional[StoredResponse]:
        return self._responses.get(response_id)

    def delete(self, response_id: str) -> Optional[StoredResponse]:
        return self._responses.pop(response_id, None)
