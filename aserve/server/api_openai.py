"""POST /v1/completions and /v1/chat/completions, in OpenAI's shapes (vLLM's extras accepted).

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
import uuid
from typing import AsyncIterator, Optional

import orjson
from aiohttp import web

from aserve.engine.async_engine import EngineDeadError
from aserve.outputs import RequestOutput
from aserve.server.app import STATE, ServerState, add_request_or_400, json_response, read_request
from aserve.server.protocol import (APIError, ChatChoice, ChatChoiceLogprobs, ChatCompletionChunk,
                                    ChatCompletionRequest, ChatCompletionResponse, ChatResponseMessage,
                                    ChatStreamChoice, ChatTokenLogprob, ChatTopLogprob, CompletionChoice,
                                    CompletionLogProbs, CompletionRequest, CompletionResponse,
                                    DeltaMessage, PromptTokensDetails, UsageInfo)

logger = logging.getLogger("aserve.server")
_MIN_LOGPROB = -9999.0  # -inf is not JSON; vLLM clamps to the same value


# ----------------------------------------------------------------------------- shared plumbing
def _add_all(state: ServerState, base_id: str, prompts: list, params_for) -> list:
    """Queue every prompt; if one is refused, abort those already queued and raise its 400."""
    streams = []
    try:
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, list):
                if not prompt:
                    raise APIError(400, "prompt must not be empty.", param="prompt")
                state.check_token_ids(prompt)
            streams.append(add_request_or_400(state, f"{base_id}-{i}", prompt, params_for(prompt)))
    except BaseException:
        for s in streams:
            s.close()
        raise
    return streams


def _fill_max_tokens(state: ServerState, params, prompt_ids_len: int):
    """max_tokens=None means 'up to the context': resolve it for this prompt."""
    if params.max_tokens is not None:
        return params
    params = params.clone()
    params.max_tokens = max(1, state.max_model_len - prompt_ids_len)
    return params


async def _last(stream) -> RequestOutput:
    final = None
    async for final in stream:
        pass
    if final.error:
        raise APIError(500, f"The request failed: {final.error}", type="server_error")
    return final


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


async def _open_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response


async def _send(response: web.StreamResponse, body: dict) -> None:
    await response.write(b"data: " + orjson.dumps(body) + b"\n\n")


async def _send_error_and_done(response: web.StreamResponse, message: str) -> None:
    await _send(response, {"error": {"message": message, "type": "server_error", "param": None,
                                     "code": None}})
    await response.write(b"data: [DONE]\n\n")


async def _stream_or_report(response: web.StreamResponse, streaming) -> None:
    """Run a streaming coroutine; once headers are sent, an error can only go in the stream."""
    try:
        await streaming
    except Exception as exc:
        expected = isinstance(exc, (APIError, EngineDeadError))
        if not expected:
            logger.error("streaming a response failed", exc_info=exc)
        await _send_error_and_done(response, str(exc) if expected else f"Internal server error: {exc!r}")


def _token_text(state: ServerState, token_id: int, lp) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return state.decode([token_id])


def _clamp(x: float) -> float:
    return max(float(x), _MIN_LOGPROB)


def _add_completion_logprobs(state, out: CompletionLogProbs, token_ids, logprobs, offset: int) -> int:
    """Append tokens (with their logprob dicts, None where unknown) in the completions shape."""
    logprobs = logprobs or [None] * len(token_ids)
    for token_id, entry in zip(token_ids, logprobs):
        chosen = entry.get(token_id) if entry else None
        token = _token_text(state, token_id, chosen)
        out.tokens.append(token)
        out.token_logprobs.append(_clamp(chosen.logprob) if chosen else None)
        out.top_logprobs.append(_top_by_text(state, entry) if entry else None)
        out.text_offset.append(offset)
        offset += len(token)
    return offset


def _top_by_text(state, entry) -> dict[str, float]:
    # OpenAI keys top_logprobs by token text; two tokens can share a text (partial UTF-8
    # bytes decode to the same '\ufffd'): keep the likelier, so the chosen token never loses.
    top: dict[str, float] = {}
    for token_id, lp in entry.items():
        text = _token_text(state, token_id, lp)
        top[text] = max(top.get(text, _MIN_LOGPROB), _clamp(lp.logprob))
    return top


def _chat_logprobs(state, token_ids, logprobs, top_n: int) -> list[ChatTokenLogprob]:
    content = []
    for token_id, entry in zip(token_ids, logprobs or []):
        chosen = entry.get(token_id) if entry else None
        token = _token_text(state, token_id, chosen)
        top = sorted((entry or {}).items(), key=lambda kv: -kv[1].logprob)[:top_n]
        content.append(ChatTokenLogprob(
            token=token, logprob=_clamp(chosen.logprob) if chosen else _MIN_LOGPROB,
            bytes=list(token.encode("utf-8")),
            top_logprobs=[ChatTopLogprob(token=(s := _token_text(state, t, lp)), logprob=_clamp(lp.logprob),
                                         bytes=list(s.encode("utf-8"))) for t, lp in top]))
    return content


def _usage(finals: list[Optional[RequestOutput]]) -> UsageInfo:
    prompt = sum(len(f.prompt_token_ids) for f in finals if f is not None)
    completion = sum(len(o.token_ids) for f in finals if f is not None for o in f.outputs)
    cached = sum(f.num_cached_tokens or 0 for f in finals if f is not None)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class _Sent:
    """How much of one choice has been streamed."""

    __slots__ = ("text_len", "num_tokens", "offset", "started", "done")

    def __init__(self):
        self.text_len = self.num_tokens = self.offset = 0
        self.started = self.done = False


def _holds_back(params) -> bool:
    return params.use_beam_search or params.best_of > params.n


# ----------------------------------------------------------------------------- /v1/completions
async def completions(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    req: CompletionRequest = await read_request(request, CompletionRequest)
    state.check_model(req.model)
    params = req.to_sampling_params()
    prompts = req.prompts()

    def params_for(prompt):
        if params.max_tokens is not None:
            return params
        n = len(prompt) if isinstance(prompt, list) else len(state.require_tokenizer("prompt")(prompt).input_ids)
        return _fill_max_tokens(state, params, n)

    request_id = f"cmpl-{uuid.uuid4().hex}"
    model, created = state.served_model_name, int(time.time())
    streams = _add_all(state, request_id, prompts, params_for)

    def prompt_text(i: int, out: RequestOutput) -> str:
        if isinstance(prompts[i], str):
            return prompts[i]
        return out.prompt if out.prompt is not None else state.decode(prompts[i])

    try:
        if not req.stream:
            finals = await asyncio.gather(*(_last(s) for s in streams))
            choices = []
            for i, out in enumerate(finals):
                for j, o in enumerate(out.outputs):
                    text, lps = o.text, None
                    if req.echo:
                        text = prompt_text(i, out) + text
                    if req.logprobs is not None:
                        lps, offset = CompletionLogProbs(), 0
                        if req.echo:
                            offset = _add_completion_logprobs(state, lps, out.prompt_token_ids,
                                                              out.prompt_logprobs, 0)
                        _add_completion_logprobs(state, lps, o.token_ids, o.logprobs, offset)
                    choices.append(CompletionChoice(index=i * params.n + j, text=text, logprobs=lps,
                                                    finish_reason=o.finish_reason, stop_reason=o.stop_reason))
            return json_response(CompletionResponse(id=request_id, created=created, model=model,
                                                    choices=choices, usage=_usage(finals)))

        response = await _open_sse(request)
        await _stream_or_report(response, _stream_completions(
            state, req, params, request_id, created, streams, prompt_text, response))
        return response
    finally:
        for s in streams:
            s.close()  # aborts whatever has not finished: the client left, or something failed


async def _stream_completions(state, req, params, request_id, created, streams, prompt_text,
                              response) -> None:
    model = state.served_model_name
    sent: dict[tuple[int, int], _Sent] = {}
    finals: list[Optional[RequestOutput]] = [None] * len(streams)
    async for i, out in _merged(streams):
        finals[i] = out
        if out.error:
            await _send_error_and_done(response, f"The request failed: {out.error}")
            return
        if _holds_back(params) and not out.finished:
            continue
        for j, o in enumerate(out.outputs):
            st = sent.setdefault((i, j), _Sent())
            if st.done:
                continue
            text = o.text[st.text_len:]
            new_ids = o.token_ids[st.num_tokens:]
            lps = CompletionLogProbs() if req.logprobs is not None else None
            if not st.started and req.echo:
                text = prompt_text(i, out) + text
                if lps is not None:
                    st.offset = _add_completion_logprobs(state, lps, out.prompt_token_ids,
                                                         out.prompt_logprobs, st.offset)
            if lps is not None:
                st.offset = _add_completion_logprobs(state, lps, new_ids,
                                                     (o.logprobs or [])[st.num_tokens:] or None,
                                                     st.offset)
            st.started = True
            st.text_len, st.num_tokens = len(o.text), len(o.token_ids)
            st.done = o.finish_reason is not None
            if text or st.done or (lps is not None and lps.tokens):
                choice = CompletionChoice(index=i * params.n + j, text=text, logprobs=lps,
                                          finish_reason=o.finish_reason, stop_reason=o.stop_reason)
                await _send(response, CompletionResponse(id=request_id, created=created, model=model,
                                                         choices=[choice]).model_dump())
    if req.stream_options and req.stream_options.include_usage:
        await _send(response, CompletionResponse(id=request_id, created=created, model=model,
                                                 choices=[], usage=_usage(finals)).model_dump())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()


# ----------------------------------------------------------------------------- /v1/chat/completions
def _chunk(request_id: str, created: int, model: str, choice: ChatStreamChoice) -> dict:
    body = ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice]).model_dump()
    delta = body["choices"][0]["delta"]
    body["choices"][0]["delta"] = {k: v for k, v in delta.items() if v is not None}
    return body


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    req: ChatCompletionRequest = await read_request(request, ChatCompletionRequest)
    state.check_model(req.model)
    params = req.to_sampling_params()
    prompt_ids = state.chat_prompt_ids(req.conversation(), req.add_generation_prompt)
    params = _fill_max_tokens(state, params, len(prompt_ids))
    top_n = req.top_logprobs or 0
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    model, created = state.served_model_name, int(time.time())
    (stream,) = _add_all(state, request_id, [prompt_ids], lambda _: params)
    try:
        if not req.stream:
            final = await _last(stream)
            choices = [ChatChoice(index=j, message=ChatResponseMessage(content=o.text),
                                  logprobs=ChatChoiceLogprobs(content=_chat_logprobs(state, o.token_ids,
                                                                                     o.logprobs, top_n))
                                  if req.logprobs else None,
                                  finish_reason=o.finish_reason, stop_reason=o.stop_reason)
                       for j, o in enumerate(final.outputs)]
            return json_response(ChatCompletionResponse(id=request_id, created=created, model=model,
                                                        choices=choices, usage=_usage([final])))

        response = await _open_sse(request)
        await _stream_or_report(response, _stream_chat(state, req, params, request_id, created,
                                                       stream, response))
        return response
    finally:
        stream.close()


async def _stream_chat(state, req, params, request_id, created, stream, response) -> None:
    model, top_n = state.served_model_name, req.top_logprobs or 0
    for j in range(params.n):  # the role comes first, before any content, as OpenAI does
        await _send(response, _chunk(request_id, created, model, ChatStreamChoice(
            index=j, delta=DeltaMessage(role="assistant", content=""))))
    sent = [_Sent() for _ in range(params.n)]
    final = None
    async for final in stream:
        if final.error:
            await _send_error_and_done(response, f"The request failed: {final.error}")
            return
        if _holds_back(params) and not final.finished:
            continue
        for j, o in enumerate(final.outputs[:params.n]):
            st = sent[j]
            if st.done:
                continue
            text = o.text[st.text_len:]
            new_ids = o.token_ids[st.num_tokens:]
            lps = None
            if req.logprobs and new_ids:
                lps = ChatChoiceLogprobs(content=_chat_logprobs(
                    state, new_ids, (o.logprobs or [])[st.num_tokens:], top_n))
            st.text_len, st.num_tokens = len(o.text), len(o.token_ids)
            st.done = o.finish_reason is not None
            if text or st.done or lps is not None:
                await _send(response, _chunk(request_id, created, model, ChatStreamChoice(
                    index=j, delta=DeltaMessage(content=text or None), logprobs=lps,
                    finish_reason=o.finish_reason, stop_reason=o.stop_reason)))
    if req.stream_options and req.stream_options.include_usage:
        await _send(response, ChatCompletionChunk(id=request_id, created=created, model=model,
                                                  choices=[], usage=_usage([final])).model_dump())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
