"""POST /generate: vLLM's simple API.

Body: {"prompt": str or token ids, "stream": bool, ...any SamplingParams field}.
Answer: {"text": [prompt + output for each of n]}. Streaming sends one JSON object per line,
each holding the full text so far, and ends by closing the stream.
"""

from __future__ import annotations

import uuid

import orjson
from aiohttp import web

from aserve.outputs import RequestOutput
from aserve.server.app import STATE, add_request_or_400, json_response, read_request
from aserve.server.prompts import prepare_prompt
from aserve.server.protocol import APIError, GenerateRequest, GenerateResponse


def _texts(output: RequestOutput, prompt_text: str) -> list[str]:
    return [prompt_text + o.text for o in output.outputs]


async def generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    req = await read_request(request, GenerateRequest)
    params = req.to_sampling_params()
    with state.admit():
        prompt = await prepare_prompt(state, req.prompt)
        stream = await add_request_or_400(state, f"generate-{uuid.uuid4().hex}", prompt, params)
    try:
        if not req.stream:
            final = None
            async for final in stream:
                pass
            if final.error:
                raise APIError(500, f"The request failed: {final.error}", type="server_error")
            return json_response(GenerateResponse(text=_texts(final, _prompt_text(state, req, final))))

        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        prompt_text = None
        async for output in stream:
            if output.error:
                line = {"error": {"message": f"The request failed: {output.error}", "type": "server_error"}}
            else:
                if prompt_text is None:
                    prompt_text = _prompt_text(state, req, output)
                line = GenerateResponse(text=_texts(output, prompt_text)).model_dump()
            await response.write(orjson.dumps(line) + b"\n")
        await response.write_eof()
        return response
    finally:
        stream.close()  # aborts the request if we leave early (client gone, error)


def _prompt_text(state, req: GenerateRequest, output: RequestOutput) -> str:
    if isinstance(req.prompt, str):
        return req.prompt
    return output.prompt if output.prompt is not None else state.decode(req.prompt)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/generate", generate)
