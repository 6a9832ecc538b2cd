"""Whether a new request may enter the engine: not while the server drains for shutdown, nor
past the bound on waiting requests (vLLM's --max-waiting-queue-length). A refusal is a 503
with Retry-After and OpenAI's error body; requests already accepted are never dropped.

Waiting counts every request taken in but not yet running: those past the door whose prompts
are being tokenized or handed to the engine thread (counted here, from the door until the
engine has taken them), and the scheduler's waiting queue. Counting from the door keeps a burst
of arrivals from all passing the check before any of them reaches the engine.

The default bound is generous: a benchmark's burst of a thousand or more requests at once is
ordinary traffic for a server of this class (vLLM bounds nothing by default), and must queue,
not fail. The bound is there so that a flood cannot grow the queue, and its latency, forever.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from aserve.server.errors import APIError

DEFAULT_MAX_WAITING = 4096  # 16 x the default max_num_seqs; 0 means unbounded (vLLM's default)
RETRY_AFTER_S = 1


class Admission:
    def __init__(self, max_waiting: int = DEFAULT_MAX_WAITING):
        if max_waiting < 0:
            raise ValueError(f"max_waiting_queue_length must be at least 0, got {max_waiting}.")
        self.max_waiting = max_waiting
        self.preparing = 0     # requests past the door, not yet handed to the engine
        self.draining = False  # shutting down: nothing new enters

    @contextlib.contextmanager
    def admit(self, async_engine, count: int = 1) -> Iterator[None]:
        """Hold `count` engine requests (one per prompt) from the door until they are handed
        to the engine (or refused); raises the 503 (or 400) when they may not enter."""
        if self.draining:
            raise APIError(503, "The server is shutting down and takes no new requests; retry "
                                "on another replica.", type="server_error", code="server_shutting_down")
        if self.max_waiting:
            if count > self.max_waiting:
                raise APIError(400, f"This request holds {count} prompts, and the server queues at "
                                    f"most {self.max_waiting} (--max-waiting-queue-length): send "
                                    f"fewer prompts per request.", param="prompt")
            # The scheduler's queue only: requests on their way to it are in self.preparing
            # (async_engine.num_waiting counts those too, which would count them twice).
            waiting = async_engine.get_stats().num_waiting + self.preparing
            if waiting + count > self.max_waiting:
                raise APIError(503, f"The server is overloaded: {waiting} requests are already "
                                    f"waiting (at most {self.max_waiting}). Retry after "
                                    f"{RETRY_AFTER_S} s.", type="server_error",
                               code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.preparing += count
        try:
            yield
        finally:
            self.preparing -= count
