"""Whether a new request may enter the engine: not while the server drains for shutdown, nor
past the bound on waiting requests (vLLM's --max-waiting-queue-length). A refusal is a 503
with Retry-After and OpenAI's error body; requests already accepted are never dropped.

Waiting counts every request taken in but not yet running, each once: those past the door whose
prompts are being tokenized (counted here, from the door until handed_over()), those handed to
the engine thread and not yet taken, and the scheduler's waiting queue (both counted by
EngineDriver.num_waiting). Counting from the door keeps a burst of arrivals from all passing the
check before any of them reaches the engine.

The default bound is generous: a benchmark's burst of a thousand or more requests at once is
ordinary traffic for a server of this class (vLLM bounds nothing by default), and must queue,
not fail. The bound is there so that a flood cannot grow the queue, and its latency, forever.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

from aserve.server.errors import APIError

DEFAULT_MAX_WAITING = 4096  # 16 x the smaller GPUs' default max_num_seqs; 0 means unbounded (vLLM's default)
RETRY_AFTER_S = 1

# The requests of the admission the current task is in that are not handed to the engine yet
# (a list, so that the tasks a handler gathers share it).
_NOT_HANDED: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("aserve_not_handed", default=None)


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
            waiting = async_engine.num_waiting + self.preparing
            if waiting + count > self.max_waiting:
                raise APIError(503, f"The server is overloaded: {waiting} requests are already "
                                    f"waiting (at most {self.max_waiting}). Retry after "
                                    f"{RETRY_AFTER_S} s.", type="server_error",
                               code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
        not_handed = [count]
        token = _NOT_HANDED.set(not_handed)
        self.preparing += count
        try:
            yield
        finally:
            self.preparing -= not_handed[0]
            _NOT_HANDED.reset(token)

    def handed_over(self) -> None:
        """One request of the current admission goes to the engine, which counts it from now on
        (as waiting, and as an open stream): it leaves `preparing`, so it is never counted twice.
        (It was, and a burst of a bound's size got 503s; a drain logged twice its requests.)"""
        not_handed = _NOT_HANDED.get()
        if not_handed is not None and not_handed[0] > 0:
            not_handed[0] -= 1
            self.preparing -= 1
