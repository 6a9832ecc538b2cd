"""POST /generate: vLLM's simple API.

Body: {"prompt": str or token ids, "stream": bool, ...any SamplingParams field}.
Answer: {"text": [prompt + output for each of n]}. Streaming sends one JSON object per line,
each holding the full text so far, and ends by closing the stream (after an {"error": ...}
line when the request failed or the server aborted it).
"""

from __future__ import annotations

import orjson
from aiohttp import web

from aserve.outputs import RequestOutput
from aserve.server.app import STATE, add_request_or_400, json_response, note_usage, read_request
from aserve.server.prompts import prepare_prompt
from aserve.server.protocol_generate import GenerateRequest, GenerateResponse
from aserve.server.random_ids import random_hex_id
from aserve.server.streaming import open_stream, request_failed, send_json_line_error, stream_or_report
from aserve.server.structured_request import check_grammar


def _texts(output: RequestOutput, prompt_text: str) -> list[str]:
    return [prompt_text + o.text for o in output.outputs]


async def generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    req = await read_request(request, GenerateRequest)
    params = req.to_sampling_params()
    with state.admit():
        await check_grammar(state, params, "guided_decoding" if req.guided_decoding is not None else "structured_outputs")
        prompt = await prepare_prompt(state, req.prompt, truncate_prompt_tokens=params.truncate_prompt_tokens)
        stream = await add_request_or_400(state, f"generate-{random_hex_id()}", prompt, params)
    try:
        if not req.stream:
            final = None
            async for final in stream:
                pass
            if final.error:
                raise request_failed(final.error)
            _note_usage(request, final)
            return json_response(GenerateResponse(text=_texts(final, _prompt_text(state, req, final))))
        response = await open_stream(request, "application/x-ndjson")
        await stream_or_report(request, response, _stream(request, state, req, stream, response),
                               send_json_line_error)
        return response
    finally:
        stream.close()  # aborts the request if we leave early (client gone, error)


async def _stream(request, state, req: GenerateRequest, stream, response: web.StreamResponse) -> None:
    prompt_text, sent = None, None
    async for output in stream:
        if output.error:
            raise request_failed(output.error)
        if prompt_text is None:
            prompt_text = _prompt_text(state, req, output)
        texts = _texts(output, prompt_text)
        # A step may add no text (a token that completes no character yet, a possible stop
        # string held back): a frame that repeats the last one tells the client nothing.
        if texts != sent:
            await response.write(orjson.dumps(GenerateResponse(text=texts).model_dump()) + b"\n")
            sent = texts
        if output.finished:
            _note_usage(request, output)
    await response.write_eof()


def _note_usage(request: web.Request, output: RequestOutput) -> None:
    note_usage(request, len(output.prompt_token_ids), sum(len(o.token_ids) for o in output.outputs))


def _prompt_text(state, req: GenerateRequest, output: RequestOutput) -> str:
    if isinstance(req.prompt, str):
        return req.prompt
    return output.prompt if output.prompt is not None else state.decode(req.prompt)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/generate", generate)
