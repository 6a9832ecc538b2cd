"""The aiohttp application: shared state, middlewares (errors, API key), small routes, serving.

One process, one uvloop loop: the HTTP handlers and the AsyncEngine's step driver share it.
Handlers are cancelled when their client disconnects (handler_cancellation=True), which closes
their request streams and so aborts the requests and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import gc
from concurrent.futures import ThreadPoolExecutor
import hmac
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import orjson
from aiohttp import web
from pydantic import BaseModel

from aserve.engine.async_engine import AsyncEngine, EngineDeadError
from aserve.server.metrics import ServerMetrics, log_status_periodically
from aserve.server.open_files import watch_open_files
from aserve.server.admission import Admission
from aserve.server.errors import APIError, bad_request_from_value_error, parse_request
from aserve.server.http_server import HttpLimits, error_response, read_body, start_site
from aserve.server.prompts import chat_prompt_ids, max_prompt_chars, refuse_giant_prompts, tokenize_text
from aserve.server.protocol import (DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList,
                                    TokenizeRequest, TokenizeResponse)

logger = logging.getLogger("aserve.server")

@dataclass
class ServerState:
    """What every handler needs; one per app."""

    async_engine: AsyncEngine
    served_model_name: str
    max_model_len: int
    vocab_size: int
    tokenizer: Any
    model_root: str = ""
    chat_template: Optional[str] = None
    api_key: Optional[str] = None
    status_interval_s: float = 5.0
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Optional[ServerMetrics] = None
    limits: HttpLimits = field(default_factory=HttpLimits)
    admission: Admission = field(default_factory=Admission)
    max_prompt_chars: int = 0  # longer text prompts cannot fit (prompts.max_prompt_chars)
    # Tokenization and chat templates run here, off the event loop (prompts.py).
    prompt_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=2, thread_name_prefix="aserve-prompts"))

    def admit(self, count: int = 1):
        """A context in which `count` new engine requests are prepared and handed to the engine
        (Admission: a 503 while draining or past the waiting-queue bound)."""
        return self.admission.admit(self.async_engine, count)

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model",
                           code="model_not_found")

    def check_token_ids(self, token_ids: list[int]) -> None:
        # An id outside the embedding table would fail the whole batch's forward, not just this one.
        for t in token_ids:
            if not 0 <= t < self.vocab_size:
                raise APIError(400, f"Token id {t} is out of vocabulary (valid ids are 0 to "
                                    f"{self.vocab_size - 1}).", param="prompt")

    def require_tokenizer(self, param: str):
        """The tokenizer, or a 400 naming `param` when the server runs without one."""
        if self.tokenizer is None:
            raise APIError(400, "This server runs without a tokenizer (--skip-tokenizer-init): send "
                                "prompts as token ids; text prompts, chat messages and /tokenize, "
                                "/detokenize need a tokenizer.", param=param)
        return self.tokenizer

    def decode(self, token_ids: list[int]) -> str:
        """Text of token ids; empty without a tokenizer (outputs then carry ids only)."""
        return self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""


STATE = web.AppKey("aserve_state", ServerState)


# ----------------------------------------------------------------------------- helpers for routes
def json_response(body: Any, status: int = 200) -> web.Response:
    if isinstance(body, BaseModel):
        body = body.model_dump()
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def read_request(request: web.Request, model_cls: type[BaseModel]) -> Any:
    """Read and validate a JSON body (within the server's size and time limits)."""
    state = request.app[STATE]
    raw = await read_body(request, state.limits)
    return parse_request(raw, model_cls, precheck=lambda body: refuse_giant_prompts(state, body))


async def add_request_or_400(state: ServerState, request_id: str, prompt, params):
    """Queue one request; the engine's ValueError (context length, empty prompt...) is a 400."""
    try:
        return await state.async_engine.add_request(request_id, prompt, params)
    except EngineDeadError as exc:
        raise APIError(503, str(exc), type="server_error", code="engine_dead") from None
    except ValueError as exc:
        raise bad_request_from_value_error(exc) from None


# ----------------------------------------------------------------------------- middlewares
@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except APIError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(APIError(exc.status, exc.reason or "HTTP error",
                                       type="invalid_request_error" if exc.status < 500 else "server_error"))
    except EngineDeadError as exc:
        return error_response(APIError(503, str(exc), type="server_error", code="engine_dead"))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # one request's bug must end that request only
        logger.exception("request %s %s failed", request.method, request.path)
        return error_response(APIError(500, f"Internal server error: {exc!r}", type="server_error"))


def _auth_middleware(api_key: str):
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path.startswith("/v1"):
            # surrogateescape: aiohttp keeps a header's undecodable (non-UTF-8) bytes as
            # surrogates, which a plain encode() refuses (that was a 500, not a 401).
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            # compare_digest: the time taken must not reveal how much of the key matched.
            if not hmac.compare_digest(given, expected):
                return error_response(APIError(401, "Incorrect API key provided. Pass it as "
                                                    "'Authorization: Bearer <key>'.",
                                               code="invalid_api_key"))
        return await handler(request)

    return auth


# ----------------------------------------------------------------------------- small routes
async def health(request: web.Request) -> web.Response:
    engine = request.app[STATE].async_engine
    if engine.is_running:
        return web.Response(status=200)
    return error_response(APIError(503, f"The engine is not running: {engine.dead_error!r}",
                                   type="server_error", code="engine_dead"))


async def metrics(request: web.Request) -> web.Response:
    text = request.app[STATE].metrics.render()
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


async def reset_prefix_cache(request: web.Request) -> web.Response:
    """vLLM's POST /reset_prefix_cache: forget every cached prompt prefix."""
    async_engine = request.app[STATE].async_engine
    await async_engine.call(async_engine.engine.reset_prefix_cache)
    return web.Response(status=200)


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    card = ModelCard(id=state.served_model_name, created=state.created, root=state.model_root,
                     max_model_len=state.max_model_len)
    return json_response(ModelList(data=[card]))


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    req = await read_request(request, TokenizeRequest)
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "Give exactly one of prompt or messages.", param="prompt")
    if req.messages is not None:
        conversation = [{"role": m.role, "content": m.text()} for m in req.messages]
        tokens = await chat_prompt_ids(state, conversation, req.add_generation_prompt)
    else:
        tokens = await tokenize_text(state, req.prompt, req.add_special_tokens)
    return json_response(TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len,
                                          tokens=tokens))


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    req = await read_request(request, DetokenizeRequest)
    state.check_model(req.model)
    state.check_token_ids(req.tokens)
    return json_response(DetokenizeResponse(prompt=state.require_tokenizer("tokens").decode(req.tokens)))


# ----------------------------------------------------------------------------- the app
def build_app(state: ServerState) -> web.Application:
    """The aiohttp application serving state's engine; starts and stops the engine with itself."""
    from aserve.server import api_generate, api_openai

    middlewares = [error_middleware]
    if state.api_key:
        middlewares.append(_auth_middleware(state.api_key))
    app = web.Application(middlewares=middlewares, client_max_size=state.limits.max_body_bytes)
    app[STATE] = state
    if state.metrics is None:
        state.metrics = ServerMetrics(state.async_engine, state.served_model_name)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    api_generate.add_routes(app)
    api_openai.add_routes(app)

    async def lifecycle(app: web.Application):
        # The model, torch and transformers leave a huge heap of long-lived objects; a full GC
        # pass over it stalls the loop for ~200 ms. Freezing them (as vLLM does) keeps later
        # collections short, so /health and the token streams never see such a pause.
        gc.collect()
        gc.freeze()
        state.async_engine.start()
        loop = asyncio.get_running_loop()
        watchers = [loop.create_task(log_status_periodically(state.async_engine, lambda: state.status_interval_s)),
                    loop.create_task(watch_open_files())]
        yield
        for task in watchers:
            task.cancel()
        await state.async_engine.shutdown()
        state.prompt_pool.shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(lifecycle)
    return app


def state_from_engine(async_engine: AsyncEngine, api_key: Optional[str] = None,
                      chat_template: Optional[str] = None) -> ServerState:
    """Read what the server needs from the engine's model config."""
    mc = async_engine.engine.model_config
    tokenizer = async_engine.engine.tokenizer
    return ServerState(async_engine=async_engine, served_model_name=mc.served_model_name,
                       max_model_len=mc.max_model_len, vocab_size=mc.vocab_size,
                       tokenizer=tokenizer, model_root=mc.model,
                       chat_template=chat_template, api_key=api_key,
                       max_prompt_chars=max_prompt_chars(tokenizer, mc.max_model_len))


# An engine that died keeps answering 503 this long (so clients and balancers see why) before
# the server exits non-zero for a supervisor to restart it.
DEAD_ENGINE_GRACE_S = 3.0


async def serve(state: ServerState, host: str, port: int) -> int:
    """Serve until SIGINT or SIGTERM (then shut down gracefully and return 0), or until the
    engine dies (then return 1, after DEAD_ENGINE_GRACE_S)."""
    runner, bound = await start_site(build_app(state), host, port, state.limits)
    shown_host = f"[{host}]" if ":" in host else host
    print(f"aserve: serving model {state.served_model_name!r} (max_model_len {state.max_model_len}) "
          f"at http://{shown_host}:{bound}  (OpenAI API at http://{shown_host}:{bound}/v1)",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            pass
    stopped = loop.create_task(stop.wait())
    died = loop.create_task(state.async_engine.wait_until_dead())
    status = 0
    try:
        await asyncio.wait({stopped, died}, return_when=asyncio.FIRST_COMPLETED)
        if died.done() and not stopped.done():
            logger.error("the engine failed (%s); the server exits in %.0f s", died.result(),
                         DEAD_ENGINE_GRACE_S)
            await asyncio.wait({stopped}, timeout=DEAD_ENGINE_GRACE_S)
            status = 1
    finally:
        stopped.cancel()
        died.cancel()
        logger.info("shutting down")
        await runner.cleanup()
    return status
