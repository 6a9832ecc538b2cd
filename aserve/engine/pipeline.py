"""Async scheduling: step k+1 is scheduled and launched on the GPU before step k's sampled
tokens reach the host, so the host's work of a step (processing outputs, scheduling, building
inputs) overlaps the GPU's instead of leaving it idle (vLLM's async scheduling).

While step k runs, every sequence it samples for holds a placeholder token; the scheduler
treats it as the sequence's next token, and the input builder marks where it lands in step
k+1's batch, where the model runner copies in step k's sampled id on the device. Once step k's
ids arrive, the placeholders are taken out and the real tokens are appended as usual.

Only requests whose sampling needs nothing of the host's token history qualify (one sample,
no beams, no penalties, no min_tokens, no logprobs, no grammar: its mask for step k+1 needs
step k's token on the host); while any other request is in the engine,
steps run synchronously. A request that finishes at step k has already been scheduled into
step k+1: that one token of work is thrown away.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Generator, Optional

from aserve.engine.request import Request

if TYPE_CHECKING:
    from aserve.engine.engine import Engine, StepPlan
    from aserve.outputs import RequestOutput
    from aserve.worker.model_runner import PendingStep

# Stands in a sequence's token list for a token still being sampled on the device.
PLACEHOLDER_TOKEN = -1

# A step as a generator: it yields each piece of model work (launching a forward, waiting for
# its ids) as a callable and is sent back the result, so one step's logic serves both the
# synchronous Engine.step and the server's driver, which runs that work off the event loop.
StepGen = Generator[Callable[[], Any], Any, list]


def can_pipeline(request: Request) -> bool:
    """Whether the request's sampling is blind to its own history on the host."""
    p = request.params
    return (request.beam_state is None and p.n == 1 and p.best_of == 1 and not p.reads_output_history
            and p.logprobs is None and p.prompt_logprobs is None
            and p.structured_outputs is None)


class StepPipeline:
    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self.in_flight: Optional[tuple["StepPlan", "PendingStep"]] = None

    def step_gen(self) -> StepGen:
        """One step (see Engine.step_gen for the protocol): returns step k's outputs, leaving
        step k+1 launched when every request can be pipelined."""
        engine = self.engine
        if self.in_flight is None:
            plan = engine.schedule()
            if plan.model_input is None or not engine.all_requests_pipelinable():
                return (yield from engine.sync_step_gen(plan))
            try:
                pending = yield functools.partial(engine.runner.launch, plan.model_input, None)
            except Exception as exc:
                return engine.fail_step(plan, exc)
            self.in_flight = (plan, pending)
        plan, pending = self.in_flight
        self.in_flight = None
        placeholder_rows = _advance(plan)

        next_plan, next_pending, launch_error = None, None, None
        if engine.all_requests_pipelinable():
            next_plan = engine.schedule(placeholder_rows)
            if next_plan.model_input is not None:
                try:
                    next_pending = yield functools.partial(engine.runner.launch, next_plan.model_input, pending)
                except Exception as exc:  # reported after step k, which may still be fine
                    launch_error = exc
        try:
            output = yield pending.result
        except Exception as exc:
            _remove_placeholders(plan)
            outputs = engine.fail_step(plan, exc)
        else:
            _remove_placeholders(plan)
            outputs = engine.process(plan, output, computed_already_advanced=True)
        if launch_error is not None:
            outputs += engine.fail_step(next_plan, launch_error)
        elif next_pending is not None:
            self.in_flight = (next_plan, next_pending)
        return outputs


    def drain(self) -> list["RequestOutput"]:
        """Finish the step in flight without launching another (before driving the engine's
        phases by hand, as a benchmark does)."""
        if self.in_flight is None:
            return []
        plan, pending = self.in_flight
        self.in_flight = None
        try:
            output = pending.result()
        except Exception as exc:
            return self.engine.fail_step(plan, exc)
        return self.engine.process(plan, output)


def resume_step(gen: StepGen, result: Any = None, error: Optional[BaseException] = None,
                started: bool = True) -> tuple[Optional[Callable[[], Any]], Optional[list]]:
    """Advance a step generator with the result (or the error) of its last piece of work:
    (the next piece of work, None), or (None, the step's outputs) once it has finished."""
    try:
        if not started:
            return next(gen), None
        return (gen.throw(error) if error is not None else gen.send(result)), None
    except StopIteration as stop:
        return None, stop.value


def run_step_gen(gen: StepGen) -> list:
    """Drive a step generator on this thread: each piece of model work runs in place."""
    work, outputs = resume_step(gen, started=False)
    while work is not None:
        try:
            result = work()
        except Exception as exc:
            work, outputs = resume_step(gen, error=exc)
        else:
            work, outputs = resume_step(gen, result)
    return outputs


def _advance(plan: "StepPlan") -> dict[int, int]:
    """Count step k's tokens as computed and give each sampling sequence a placeholder.
    Returns each placeholder's row among step k's sampled ids, by sequence id."""
    rows: dict[int, int] = {}
    for item, span in zip(plan.sched.scheduled, plan.row_spans):
        if item.request.is_finished:
            continue
        seq = item.seq
        seq.num_computed_tokens = item.start + item.num_new_tokens
        if item.samples:
            seq.token_ids.append(PLACEHOLDER_TOKEN)
            rows[seq.seq_id] = span.sample_start
    return rows


def _remove_placeholders(plan: "StepPlan") -> None:
    for item in plan.sched.scheduled:
        if item.samples and item.seq.token_ids and item.seq.token_ids[-1] == PLACEHOLDER_TOKEN:
            item.seq.token_ids.pop()
