"""What the event loop hands the engine thread between steps (an add, an abort as a request id,
a call), how the engine thread applies it, and how the loop settles the outcome."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable

from aserve.sampling_params import SamplingParams

logger = logging.getLogger("aserve.engine")


def settle(results: list) -> None:
    """Give each op's future its result or error (apply_op made them)."""
    for future, result, error in results:
        if not future.done():  # an add whose caller left is cancelled already
            future.set_exception(error) if error is not None else future.set_result(result)


@dataclass
class Add:
    """A request for the engine thread to add; `accepted` gets its result (None or the error)."""

    request_id: str
    prompt: Any
    params: SamplingParams
    arrival_time: float
    accepted: asyncio.Future


@dataclass
class Call:
    """A function for the engine thread to run between steps (e.g. resetting the prefix cache)."""

    fn: Callable[[], Any]
    done: asyncio.Future


def apply_op(engine, op, results: list) -> None:
    """In the engine thread, between steps: apply one op; an add's or a call's outcome is
    appended to results as (future, result, error), for the loop to settle."""
    if isinstance(op, str):
        if op not in engine.requests:   # it finished first: nothing to abort
            return
        try:
            engine.abort_request(op)
        except Exception:  # an abort must never take the engine down with it
            logger.exception("aborting request %s failed", op)
        else:  # logged here, where it happens: the log and /metrics' count agree
            logger.info("Aborted request %s.", op)
    elif isinstance(op, Add):
        try:
            engine.add_request(op.request_id, op.prompt, op.params, arrival_time=op.arrival_time)
        except Exception as exc:  # a bad request: its own 400 (or 500), nobody else's
            results.append((op.accepted, None, exc))
        else:
            results.append((op.accepted, None, None))
    else:
        try:
            results.append((op.done, op.fn(), None))
        except Exception as exc:
            results.append((op.done, None, exc))
