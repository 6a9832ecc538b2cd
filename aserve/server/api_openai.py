"""POST /v1/completions in OpenAI's shape (vLLM's extras accepted), and what it shares with
/v1/chat/completions (api_chat.py): usage, and when a stream holds its choices back.

Each prompt of a request is one engine request; with n > 1 its samples are choices
prompt_index * n + sample_index. Streams are server-sent events. Engine outputs are
cumulative, so each choice remembers how much text and how many tokens it has sent, and the
next chunk carries only the rest. Beam search and best_of > n only know their final ranking
at the end, so their streams hold every choice back until the request finishes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Optional

from aiohttp import web

from aserve.outputs import RequestOutput
from aserve.server.app import STATE, ServerState, json_response, note_usage, read_request
from aserve.server.chunk_sink import TEXT_MARK, ChoiceProgress, TextChunkSink
from aserve.server.engine_requests import add_all, fill_max_tokens, last_output
from aserve.server.openai_logprobs import add_completion_logprobs, copy_completion_logprobs, prompt_logprobs_out
from aserve.server.protocol import CompletionRequest
from aserve.server.protocol_answers import (CompletionChoice, CompletionLogProbs, CompletionResponse,
                                            CompletionStreamChoice, CompletionStreamResponse, PromptTokensDetails,
                                            UsageInfo)
from aserve.server.stream_chunks import completion_text_chunk
from aserve.server.streaming import SSEEvents, open_stream, request_failed, send_sse_error_and_done, stream_or_report
from aserve.server.structured_request import check_grammar, constraint_field

logger = logging.getLogger("aserve.server")


# ----------------------------------------------------------------------------- shared plumbing
async def _merged(streams) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several request streams, as they come, tagged with the prompt index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as exc:
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def total_usage(request: web.Request, finals: list[Optional[RequestOutput]]) -> UsageInfo:
    prompt = sum(len(f.prompt_token_ids) for f in finals if f is not None)
    completion = sum(len(o.token_ids) for f in finals if f is not None for o in f.outputs)
    cached = sum(f.num_cached_tokens or 0 for f in finals if f is not None)
    note_usage(request, prompt, completion)
    details = PromptTokensDetails(cached_tokens=cached) if request.app[STATE].enable_prompt_tokens_details else None
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=details)


def usage_wanted(state: ServerState, options) -> tuple[bool, bool]:
    """(a usage chunk at the end, usage on every chunk) of a stream: as its stream_options ask,
    or both with --enable-force-include-usage, as vLLM's flag."""
    if state.enable_force_include_usage:
        return True, True
    if options is None:
        return False, False
    return options.final_usage, options.continuous_usage


def holds_back(params) -> bool:
    """Whether a stream holds every choice back until the end (its ranking is known only then)."""
    return params.use_beam_search or params.best_of > params.n


# ----------------------------------------------------------------------------- /v1/completions
async def completions(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    req: CompletionRequest = await read_request(request, CompletionRequest)
    state.check_model(req.model)
    params = req.to_sampling_params(state.sampling_defaults)
    prompts = req.prompts()
    as_ids = req.tokens_as_ids(state.return_tokens_as_token_ids)

    request_id = req.response_id("cmpl")
    model, created = state.served_model_name, int(time.time())
    with state.admit(len(prompts)):  # a draining or full server refuses before any compile
        await check_grammar(state, params, constraint_field(req))
        streams = await add_all(state, request_id, prompts,
                                lambda num_tokens: fill_max_tokens(state, params, num_tokens),
                                req.add_special_tokens, req.truncate_prompt_tokens,
                                truncation_side=req.truncation_side)

    def prompt_text(i: int, out: RequestOutput) -> str:
        if isinstance(prompts[i], str):
            return prompts[i]
        return out.prompt if out.prompt is not None else state.decode(out.prompt_token_ids)

    async def echoed_logprobs(out: RequestOutput) -> tuple[CompletionLogProbs, int]:
        """The logprobs every choice of an echoing request starts with (built once for its n)."""
        lps = CompletionLogProbs()
        if not req.echo:
            return lps, 0
        return lps, await add_completion_logprobs(state, lps, out.prompt_token_ids, out.prompt_logprobs, 0,
                                                  as_ids)

    try:
        if not req.stream:
            finals = await asyncio.gather(*(last_output(s) for s in streams))
            choices, token_ids = [], []   # token_ids: per choice, (prompt ids, output ids)
            for i, out in enumerate(finals):
                prompt_lps, prompt_end = (await echoed_logprobs(out) if req.logprobs is not None
                                          else (None, 0))
                prompt_logprobs = (await prompt_logprobs_out(out.prompt_logprobs)
                                   if out.prompt_logprobs is not None else None)
                for j, o in enumerate(out.outputs):
                    text, lps = ("" if req.echo_only else o.text), None
                    if req.echo:
                        text = prompt_text(i, out) + text
                    if prompt_lps is not None:
                        lps = copy_completion_logprobs(prompt_lps)
                        if not req.echo_only:
                            await add_completion_logprobs(state, lps, o.token_ids, o.logprobs, prompt_end, as_ids)
                    choices.append(CompletionChoice(index=i * params.n + j, text=text, logprobs=lps,
                                                    finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                                                    prompt_logprobs=prompt_logprobs))
                    token_ids.append((out.prompt_token_ids, o.token_ids))
            body = CompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                      usage=total_usage(request, finals)).model_dump()
            if req.return_token_ids:
                for choice, (prompt_ids, ids) in zip(body["choices"], token_ids):
                    choice.update(prompt_token_ids=list(prompt_ids), token_ids=list(ids))
            return json_response(body)

        response = await open_stream(request, "text/event-stream")
        await stream_or_report(request, response, _stream_completions(
            request, state, req, params, request_id, created, streams, prompt_text, echoed_logprobs,
            response, as_ids), send_sse_error_and_done)
        return response
    finally:
        for s in streams:
            s.close()  # aborts whatever has not finished: the client left, or something failed


def _choice_usage(out: RequestOutput, completion_tokens: int) -> UsageInfo:
    """vLLM's continuous usage: this prompt's tokens and this choice's tokens so far."""
    prompt = len(out.prompt_token_ids)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion_tokens,
                     total_tokens=prompt + completion_tokens)


async def _stream_completions(request, state, req, params, request_id, created, streams, prompt_text,
                              echoed_logprobs, response, as_ids) -> None:
    model = state.served_model_name
    final_usage, continuous = usage_wanted(state, req.stream_options)
    sent: dict[tuple[int, int], ChoiceProgress] = {}
    echoed: dict[int, tuple[CompletionLogProbs, int]] = {}  # by prompt: built once for its n
    finals: list[Optional[RequestOutput]] = [None] * len(streams)
    unfinished, events = len(streams), SSEEvents(response)
    if (len(streams) == 1 and params.n == 1 and req.logprobs is None and not req.echo and not continuous
            and not holds_back(params) and not req.return_token_ids):
        # One plain choice: its chunks go out from the dispatch.
        streams[0].set_sink(TextChunkSink(
            request.transport, response.chunked, sent.setdefault((0, 0), ChoiceProgress()),
            completion_text_chunk(request_id, created, model, 0, TEXT_MARK, None, None)))
    async for i, out in _merged(streams):
        finals[i] = out
        if out.error:
            raise request_failed(out.error)
        unfinished -= out.finished
        if holds_back(params) and not out.finished:
            continue
        for j, o in enumerate(out.outputs):
            st = sent.setdefault((i, j), ChoiceProgress())
            if st.done:
                continue
            text = "" if req.echo_only else o.text[st.text_len:]
            new_ids = [] if req.echo_only else o.token_ids[st.num_tokens:]
            lps = CompletionLogProbs() if req.logprobs is not None else None
            if not st.started and req.echo:
                text = prompt_text(i, out) + text
                if lps is not None:
                    if i not in echoed:
                        echoed[i] = await echoed_logprobs(out)
                    lps = copy_completion_logprobs(echoed[i][0])
                    st.offset = echoed[i][1]
            if lps is not None:
                st.offset = await add_completion_logprobs(state, lps, new_ids,
                                                          (o.logprobs or [])[st.num_tokens:] or None,
                                                          st.offset, as_ids)
            first, st.started = not st.started, True
            st.text_len, st.num_tokens = len(o.text), len(o.token_ids)
            st.done = o.finish_reason is not None
            # A chunk for every step that brought tokens, even with no text yet (a token that is
            # part of a character): clients that count chunks as tokens count right, as with vLLM.
            if text or new_ids or st.done or (lps is not None and lps.tokens):
                if lps is None and not continuous:  # the common chunk, without pydantic
                    body = completion_text_chunk(request_id, created, model, i * params.n + j, text,
                                                 o.finish_reason, o.stop_reason)
                else:
                    choice = CompletionStreamChoice(index=i * params.n + j, text=text, logprobs=lps,
                                                    finish_reason=o.finish_reason, stop_reason=o.stop_reason)
                    body = CompletionStreamResponse(
                        id=request_id, created=created, model=model, choices=[choice],
                        usage=_choice_usage(out, len(o.token_ids)) if continuous else None).model_dump()
                if req.return_token_ids:   # vLLM's: the new ids, and the prompt's with a choice's first
                    body["choices"][0]["token_ids"] = list(new_ids)
                    if first:
                        body["choices"][0]["prompt_token_ids"] = list(out.prompt_token_ids)
                await events.send(body, last=not unfinished)
    usage = total_usage(request, finals)
    if final_usage:
        await events.send(CompletionStreamResponse(id=request_id, created=created, model=model,
                                                   choices=[], usage=usage).model_dump(), last=True)
    await events.end()   # the last output's chunks, the usage and [DONE]: one write


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)
