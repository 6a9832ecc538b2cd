"""The aiohttp application: shared state, its middlewares in order (access log, CORS, errors,
readiness, API key; errors and the key in middlewares.py) and the small routes. serving.py runs it (bind, load, signals, drain).

One uvloop loop for HTTP; an EngineDriver (engine/engine_driver.py) feeds the engine, which
steps in a thread of the server's process or in a process of its own.
Handlers are cancelled when their client disconnects (handler_cancellation=True), which closes
their request streams and so aborts the requests and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import orjson
from aiohttp import web
from pydantic import BaseModel

from aserve.engine.engine_driver import EngineDriver
from aserve.engine.gc_policy import serve_with_fewer_collections, stop_serving_with_fewer_collections
from aserve.server.access_log import USAGE, access_log_middleware
from aserve.server.admission import Admission
from aserve.server.cors import CorsPolicy, cors_headers_on_prepare, cors_middleware
from aserve.server.errors import (APIError, bad_request_from_value_error,
                                  check_json_content_type, parse_request)
from aserve.server.http_server import HttpLimits, error_response, read_body
from aserve.server.metrics import ServerMetrics, log_status_periodically
from aserve.server.middlewares import auth_middleware, error_middleware
from aserve.server.open_files import watch_open_files
from aserve.server.prompts import (ChatTemplateOptions, chat_prompt_ids, max_prompt_chars, refuse_giant_prompts,
                                   tokenize_text)
from aserve.server.protocol import conversation_of
from aserve.server.protocol_info import (DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList,
                                         TokenizeRequest, TokenizeResponse)
from aserve.server.reasoning import ReasoningParser, reasoning_parser_for
from aserve.server.root_path import mount_under_root_path
from aserve.server.tool_calls import plan_tools
from aserve.server.responses_store import ResponseStore

logger = logging.getLogger("aserve.server")

@dataclass
class ServerState:
    """What every handler needs; one per app. The engine's part is set by attach() once the
    model has loaded (the server binds its port and answers /health before that)."""

    chat_template: Optional[str] = None
    api_key: Optional[str] = None
    # tool_choice "auto": the --tool-call-parser, set only with --enable-auto-tool-choice (as vLLM).
    tool_call_parser: Optional[str] = None
    reasoning_parser: Optional[str] = None   # --reasoning-parser's name; its parser is `reasoning`
    log_requests: bool = True   # the per-request access log line (--disable-log-requests)
    response_role: str = "assistant"   # a chat reply's role after a generation prompt (--response-role)
    chat_template_content_format: str = "auto"   # messages' content as string or parts (content_format.py)
    return_tokens_as_token_ids: bool = False  # logprobs name tokens 'token_id:N' (a request may override)
    trust_request_chat_template: bool = False  # a request's own chat_template is rendered
    status_interval_s: float = 5.0
    metrics_prefix: str = "aserve"   # /metrics names are `<prefix>:<vLLM's name>` (--metrics-prefix)
    log_stats: bool = True           # the periodic status line (--disable-log-stats turns it off)
    # vLLM's optional routes and headers (request_tracking.py, api_server_info.py).
    enable_server_load_tracking: bool = False
    enable_tokenizer_info_endpoint: bool = False
    enable_request_id_headers: bool = False
    # usage.prompt_tokens_details (the prefix cache's share of the prompt), only when asked
    # (--enable-prompt-tokens-details), as vLLM: clients compare usage with the bare three counts.
    enable_prompt_tokens_details: bool = False
    # Every stream reports usage, on each chunk and at its end (--enable-force-include-usage).
    enable_force_include_usage: bool = False
    root_path: str = ""   # --root-path: every route under this prefix too (root_path.py)
    server_load: int = 0             # requests in flight on the tracked routes (GET /load)
    bound_port: int = 0              # the port serving, once bound (serving.py)
    # In an API server other than the first (--api-server-count): the first's Unix socket, to
    # which /v1/responses goes, since its store lives there (responses_proxy.py).
    responses_primary: Optional[str] = None
    # Set once this server listens on its port (a multiprocessing Event: the first API server
    # waits for every other's before it reports ready, api_servers.py).
    listening: Any = None
    created: int = field(default_factory=lambda: int(time.time()))
    limits: HttpLimits = field(default_factory=HttpLimits)
    admission: Admission = field(default_factory=Admission)
    responses: ResponseStore = field(default_factory=ResponseStore)   # /v1/responses' store=true
    cors: CorsPolicy = field(default_factory=CorsPolicy)   # as vLLM's default: any origin
    # Tokenization and chat templates run here, off the event loop (prompts.py).
    prompt_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=2, thread_name_prefix="aserve-prompts"))
    # ---- from the engine (attach)
    async_engine: Optional[EngineDriver] = None
    served_model_name: str = ""
    served_model_aliases: tuple[str, ...] = ()   # --served-model-name's other names
    max_model_len: int = 0
    vocab_size: int = 0
    tokenizer: Any = None
    model_root: str = ""
    max_prompt_chars: int = 0  # longer text prompts cannot fit (prompts.max_prompt_chars)
    metrics: Optional[ServerMetrics] = None
    reasoning: Optional[ReasoningParser] = None   # thinking apart from the answer (reasoning.py)
    sampling_defaults: dict = field(default_factory=dict)   # the model's (ModelConfig.sampling_defaults)
    background: list = field(default_factory=list)  # tasks running while the engine serves
    saved_gc_thresholds: Optional[tuple] = None   # the collector's, given back when serving stops

    @property
    def ready(self) -> bool:
        return self.async_engine is not None

    def attach(self, async_engine: EngineDriver) -> None:
        """Take the loaded engine and read what the server needs from its model config."""
        mc = async_engine.engine.model_config
        self.tokenizer = async_engine.engine.tokenizer
        self.served_model_name, self.model_root = mc.served_model_name, mc.model
        self.max_model_len, self.vocab_size = mc.max_model_len, mc.vocab_size
        self.max_prompt_chars = max_prompt_chars(self.tokenizer, mc.max_model_len)
        self.reasoning = reasoning_parser_for(self.reasoning_parser, self.tokenizer)
        self.sampling_defaults = dict(mc.sampling_defaults)
        self.metrics = ServerMetrics(async_engine, mc.served_model_name, self.metrics_prefix)
        self.async_engine = async_engine

    def admit(self, count: int = 1):
        """A context in which `count` new engine requests are prepared and handed to the engine
        (Admission: a 503 while draining or past the waiting-queue bound)."""
        return self.admission.admit(self.async_engine, count)

    def check_model(self, name: Optional[str]) -> None:
        # vLLM serves its base model for a missing or empty name ("" as some clients send).
        if name and name not in self.model_names:
            raise APIError(404, f"The model `{name}` does not exist.", param="model",
                           code="model_not_found")

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name the served model answers to; answers name the first."""
        return (self.served_model_name, *self.served_model_aliases)

    def check_token_ids(self, token_ids: list[int]) -> None:
        # An id outside the embedding table would fail the whole batch's forward, not just this one.
        # min and max run in C: the loop below only names the first bad id (a burst's handlers
        # checked 128 ids each token by token, ~10 us a request of the server's loop).
        if not token_ids or (min(token_ids) >= 0 and max(token_ids) < self.vocab_size):
            return
        for t in token_ids:
            if not 0 <= t < self.vocab_size:
                # vLLM refuses a negative id as its protocol's bound does ("greater than or equal
                # to 0"), a large one as out of vocabulary: clients' tests match either.
                bound = ": an id must be greater than or equal to 0" if t < 0 else ""
                raise APIError(400, f"Token id {t} is out of vocabulary{bound} (the vocabulary's "
                                    f"{self.vocab_size} tokens are ids 0 to {self.vocab_size - 1}).",
                               param="prompt")

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


async def read_request(request: web.Request, model_cls: type[BaseModel], prompt_field: str = "prompt",
                       precheck: Optional[Callable[[dict], None]] = None) -> Any:
    """Read and validate a JSON body (within the server's size and time limits); a prompt that
    cannot fit (in prompt_field: /v1/embeddings' is `input`) is refused before validation.
    precheck: a route's own look at the parsed body first (it may reshape it)."""
    state = request.app[STATE]
    check_json_content_type(request.headers.get("Content-Type"))
    raw = await read_body(request, state.limits)

    def checks(body: dict) -> None:
        if precheck is not None:
            precheck(body)
        refuse_giant_prompts(state, body, prompt_field)

    return parse_request(raw, model_cls, precheck=checks)


async def add_request_or_400(state: ServerState, request_id: str, prompt, params):
    """Queue one request; the engine's ValueError (context length, empty prompt...) is a 400."""
    state.admission.handed_over()  # from here on the engine counts it
    try:
        return await state.async_engine.add_request(request_id, prompt, params)
    except ValueError as exc:
        raise bad_request_from_value_error(exc) from None


def note_usage(request: web.Request, prompt_tokens: int, completion_tokens: int) -> None:
    """Tokens in and out of this request, for its access log line."""
    request[USAGE] = (prompt_tokens, completion_tokens)


# ----------------------------------------------------------------------------- middlewares
@web.middleware
async def readiness_middleware(request: web.Request, handler):
    if not request.app[STATE].ready:
        raise APIError(503, "The model is still loading; retry shortly.", type="server_error",
                       code="model_loading", headers={"Retry-After": "5"})
    return await handler(request)


# ----------------------------------------------------------------------------- small routes
async def health(request: web.Request) -> web.Response:
    """200 while the server takes requests; 503 while loading, draining or dead (the reason in
    OpenAI's error body). Reads two flags: never waits for a step."""
    state = request.app[STATE]
    engine = state.async_engine
    if not engine.is_running:
        return error_response(APIError(503, f"The engine is not running: {engine.dead_error!r}",
                                       type="server_error", code="engine_dead"))
    if state.admission.draining:
        return error_response(APIError(503, "The server is shutting down.", type="server_error",
                                       code="server_shutting_down"))
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    await state.async_engine.refresh_stats()
    text = state.metrics.render()
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


async def reset_prefix_cache(request: web.Request) -> web.Response:
    """vLLM's POST /reset_prefix_cache: forget every cached prompt prefix."""
    async_engine = request.app[STATE].async_engine
    await async_engine.call(async_engine.engine.reset_prefix_cache)
    return web.Response(status=200)


def _model_card(state, name: str) -> ModelCard:
    return ModelCard(id=name, created=state.created, root=state.model_root, max_model_len=state.max_model_len)


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response(ModelList(data=[_model_card(state, name) for name in state.model_names]))


async def retrieve_model(request: web.Request) -> web.Response:
    """OpenAI's GET /v1/models/{model} (the openai client's models.retrieve); a model name may
    hold slashes (facebook/opt-125m), so the route takes the rest of the path."""
    state = request.app[STATE]
    name = request.match_info["model"]
    if name not in state.model_names:
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
    return json_response(_model_card(state, name))


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    req = await read_request(request, TokenizeRequest)
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "Give exactly one of prompt or messages.", param="prompt")
    if req.messages is not None:
        if req.continue_final_message and req.add_generation_prompt:
            raise APIError(400, "Cannot set both continue_final_message and add_generation_prompt "
                                "to true.", param="continue_final_message")
        tokens = await chat_prompt_ids(state, conversation_of(req.messages), req.add_generation_prompt, ChatTemplateOptions(
            continue_final_message=req.continue_final_message, add_special_tokens=bool(req.add_special_tokens),
            chat_template=req.chat_template, chat_template_kwargs=req.chat_template_kwargs),
            tools=plan_tools(req.tools, "none", None).template_tools())
    else:
        add_special_tokens = True if req.add_special_tokens is None else req.add_special_tokens
        tokens = await tokenize_text(state, req.prompt, add_special_tokens)
    token_strs = state.tokenizer.convert_ids_to_tokens(tokens) if req.return_token_strs else None
    return json_response(TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len,
                                          tokens=tokens, token_strs=token_strs))


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    req = await read_request(request, DetokenizeRequest)
    state.check_model(req.model)
    state.check_token_ids(req.tokens)
    return json_response(DetokenizeResponse(prompt=state.require_tokenizer("tokens").decode(req.tokens)))


# ----------------------------------------------------------------------------- the app
def build_app(state: ServerState) -> web.Application:
    """The aiohttp application serving state's engine; starts and stops the engine with itself
    when it is ready at start (else serving.py starts it once it has loaded)."""
    from aserve.server import (api_anthropic, api_chat, api_chat_batch, api_embeddings, api_generate, api_openai,
                               api_pooling, api_responses, api_sagemaker, api_scores, api_server_info,
                               responses_proxy)
    from aserve.server.request_tracking import add_request_id_header, load_tracking_middleware

    # CORS outside the rest: a browser's preflight is answered before the key is asked for.
    middlewares = [cors_middleware(state.cors), error_middleware, readiness_middleware]
    if state.log_requests:
        middlewares.insert(0, access_log_middleware)
    if state.api_key:
        middlewares.append(auth_middleware(state.api_key))
    if state.enable_server_load_tracking:  # innermost: requests refused at the door are no load
        middlewares.append(load_tracking_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=state.limits.max_body_bytes)
    app[STATE] = state
    if state.enable_request_id_headers:
        app.on_response_prepare.append(add_request_id_header)
    app.on_response_prepare.append(cors_headers_on_prepare(state.cors))
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    api_generate.add_routes(app)
    api_openai.add_routes(app)
    api_chat.add_routes(app)
    api_chat_batch.add_routes(app)
    if state.responses_primary is not None:
        responses_proxy.add_routes(app, state.responses_primary)
    else:
        api_responses.add_routes(app)
    api_anthropic.add_routes(app)
    api_embeddings.add_routes(app)
    api_pooling.add_routes(app)
    api_scores.add_routes(app)
    api_sagemaker.add_routes(app)
    api_server_info.add_routes(app, state.enable_tokenizer_info_endpoint)
    mount_under_root_path(app, state.root_path)   # last: every route above, under --root-path too

    async def lifecycle(app: web.Application):
        if state.ready:
            start_engine(state)
        yield
        await stop_engine(state)

    app.cleanup_ctx.append(lifecycle)
    return app


def start_engine(state: ServerState) -> None:
    """Start the attached engine's driver and the tasks that watch it."""
    # The model, torch and transformers leave a huge heap of long-lived objects; a full GC
    # pass over it stalls the loop for ~200 ms. Freezing them (as vLLM does) keeps later
    # collections short, and fewer of them run while serving (engine/gc_policy.py), so /health
    # and the token streams never see such a pause.
    state.saved_gc_thresholds = serve_with_fewer_collections()
    state.async_engine.start()
    loop = asyncio.get_running_loop()
    state.background = [loop.create_task(watch_open_files())]
    if state.log_stats:
        state.background.append(loop.create_task(
            log_status_periodically(state.async_engine, lambda: state.status_interval_s)))


async def stop_engine(state: ServerState) -> None:
    for task in state.background:
        task.cancel()
    if state.ready:
        await state.async_engine.shutdown()
    state.prompt_pool.shutdown(wait=False, cancel_futures=True)
    if state.saved_gc_thresholds is not None:
        stop_serving_with_fewer_collections(state.saved_gc_thresholds)
        state.saved_gc_thresholds = None


def state_from_engine(async_engine: EngineDriver, api_key: Optional[str] = None,
                      chat_template: Optional[str] = None, **options) -> ServerState:
    """A ready state around a loaded engine; options: other ServerState fields."""
    state = ServerState(api_key=api_key, chat_template=chat_template, **options)
    state.attach(async_engine)
    return state
