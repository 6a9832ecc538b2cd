"""Stored responses of /v1/responses (store=true, OpenAI's default): what GET, DELETE,
cancel, input_items and previous_response_id read.

In memory and bounded: past max_responses the oldest response is forgotten (vLLM's store,
behind VLLM_ENABLE_RESPONSES_API_STORE, grows without bound). max_responses 0 turns the store
off: store=true is then ignored, as vLLM ignores it by default, and a background response is
refused (it can only be read from the store).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Coroutine, Optional

DEFAULT_MAX_STORED_RESPONSES = 1000


@dataclass
class StoredResponse:
    body: dict                 # the response object, as GET returns it
    input_items: list[dict]    # this request's input items, ids and all
    # The conversation this response answered, without its instructions (a chained request
    # brings its own, as OpenAI's): the earlier turns' messages and this request's input.
    messages: list[dict] = field(default_factory=list)
    task: Optional[asyncio.Task] = None   # a background response's run


class ResponseStore:
    def __init__(self, max_responses: int = DEFAULT_MAX_STORED_RESPONSES) -> None:
        if max_responses < 0:
            raise ValueError(f"max_stored_responses must be at least 0, got {max_responses}.")
        self.max_responses = max_responses
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

    def get(self, response_id: str) -> Optional[StoredResponse]:
        return self._responses.get(response_id)

    def delete(self, response_id: str) -> Optional[StoredResponse]:
        return self._responses.pop(response_id, None)
