"""How often the garbage collector runs while the engine works.

CPython collects its youngest generation every 700 net container allocations, and the older
ones every 10 of those. A step allocates thousands (outputs, token lists, the step's plans), so
a served run of 1000 requests made ~250 collections of the youngest generation, ~23 of the
middle one and 2 full ones, which found nothing to free (the engine makes no reference cycles
on its path) and held the GIL, the engine and the event loop together, for 74-123 ms of a
1.2 s run; a full one alone for 20-35 ms (the CPU proxy of bench/RESULTS.md, seventeenth
session). A first threshold of 50,000 leaves one or two collections of 6-12 ms in such a run.

The server sets it for its process (with its heap frozen after start-up). An offline run sets
it only while generate() works and puts the caller's back after: the engine runs inside the
user's script, whose own objects it must not freeze.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

# Net container allocations between collections of the youngest generation (CPython: 700).
FIRST_GENERATION_THRESHOLD = 50_000


def serve_with_fewer_collections() -> tuple[int, int, int]:
    """For a server process, once start-up is done: what start-up built (the model's
    modules, the tokenizer, torch's and transformers' module state: millions of objects) lives
    as long as the process, so it is frozen out of every later collection (vLLM freezes its
    heap too), and the youngest generation is collected less often. Returns the thresholds
    to give back to stop_serving_with_fewer_collections()."""
    gc.collect()
    gc.freeze()
    saved = gc.get_threshold()
    first, middle, oldest = saved
    gc.set_threshold(max(first, FIRST_GENERATION_THRESHOLD), middle, oldest)
    return saved


def stop_serving_with_fewer_collections(saved: tuple[int, int, int]) -> None:
    """A server stopped in a process that goes on (tests, an application that embeds the
    server): the frozen heap may be collected again, so the stopped engine's cycles (and its
    model) are freed, and the collector runs as often as before."""
    gc.unfreeze()
    gc.set_threshold(*saved)


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """The youngest generation collected less often inside the block; the caller's thresholds
    are restored after it."""
    saved = gc.get_threshold()
    gc.set_threshold(max(saved[0], FIRST_GENERATION_THRESHOLD), *saved[1:])
    try:
        yield
    finally:
        gc.set_threshold(*saved)
