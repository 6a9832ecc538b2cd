"""How the OpenAI routes hand prompts to the engine and wait for them (completions, chat and
responses share it): prepare every prompt, queue them together, resolve max_tokens=None, and
wait for a request's final output."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Optional

from aserve.engine.request_factory import TokenizedPrompt
from aserve.outputs import RequestOutput
from aserve.server.errors import bad_request_from_value_error
from aserve.server.prompts import prepare_prompt
from aserve.server.streaming import request_failed

if TYPE_CHECKING:
    from aserve.server.app import ServerState


async def add_all(state: "ServerState", base_id: str, prompts: list, params_for,
                  add_special_tokens: bool = True, truncate_prompt_tokens: Optional[int] = None,
                  field: str = "prompt", truncation_side: Optional[str] = None) -> list:
    """Prepare (tokenize) every prompt, then queue them all at once (the engine takes them at
    one step boundary); if one is refused, abort those taken and raise its error.
    params_for(num_prompt_tokens) gives each its params; field names the prompts in errors.
    Call within state.admit()."""
    prepared = [await prepare_prompt(state, prompt, add_special_tokens, truncate_prompt_tokens, field,
                                     truncation_side) for prompt in prompts]
    engine = state.async_engine
    # Every add is posted here, in this handler's turn of the loop, then awaited. Adds in tasks
    # of asyncio.gather's each waited for a later turn, behind a burst's other handlers: on an
    # H100 the median request of a burst of 1000 reached the engine 61 ms after its handler
    # began; posted at once, the burst's median TTFT fell from 518 to 268-278 ms
    # (bench/RESULTS.md, 2026-12-06).
    submitted = []
    try:
        for i, prompt in enumerate(prepared):
            params = params_for(len(prompt.token_ids if isinstance(prompt, TokenizedPrompt) else prompt))
            state.admission.handed_over()  # from here on the engine counts it
            submitted.append(engine.submit(f"{base_id}-{i}", prompt, params))
    except BaseException as exc:   # the adds already posted are aborted
        _abandon(submitted)
        if isinstance(exc, ValueError):   # a refusal before the engine (a request id in use)
            raise bad_request_from_value_error(exc) from None
        raise
    if len(submitted) == 1:   # the common case: awaited here, without a task of gather's
        return [await _accepted_or_400(engine, *submitted[0])]
    added = await asyncio.gather(*(_accepted_or_400(engine, *s) for s in submitted), return_exceptions=True)
    errors = [a for a in added if isinstance(a, BaseException)]
    if errors:
        for stream in added:
            if not isinstance(stream, BaseException):
                stream.close()
        raise errors[0]
    return added


async def _accepted_or_400(engine, stream, accepted):
    """A submitted request's stream once the engine took it; its ValueError is a 400."""
    try:
        return await engine.once_accepted(stream, accepted)
    except ValueError as exc:
        raise bad_request_from_value_error(exc) from None


def _abandon(submitted: list) -> None:
    """Abort requests submitted before a later one of the same request failed to be."""
    for stream, accepted in submitted:
        accepted.cancel()   # nobody will wait for it; the engine's answer is then dropped
        stream.close()


def fill_max_tokens(state: "ServerState", params, prompt_ids_len: int):
    """max_tokens=None means 'up to the context' (or the model's default max_tokens, from its
    generation config, where that is less, as vLLM): resolve it for this prompt."""
    if params.max_tokens is not None:
        return params
    params = params.clone()
    room = state.max_model_len - prompt_ids_len
    params.max_tokens = max(1, min(room, state.sampling_defaults.get("max_tokens", room)))
    return params


async def last_output(stream) -> RequestOutput:
    """A request's final output; an error the engine ended it with is raised as an APIError."""
    final = None
    async for final in stream:
        pass
    if final.error:
        raise request_failed(final.error)
    return final
