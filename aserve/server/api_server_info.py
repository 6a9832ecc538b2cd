"""vLLM's small informational routes: /version, /load and /tokenizer_info."""

from __future__ import annotations

from aiohttp import web

from aserve import __version__
from aserve.server.app import STATE, json_response


async def version(request: web.Request) -> web.Response:
    return json_response({"version": __version__})


async def load(request: web.Request) -> web.Response:
    """vLLM's GET /load: the requests in flight on the generation and tokenizer routes, counted
    only with --enable-server-load-tracking (0 without, as vLLM answers)."""
    return json_response({"server_load": request.app[STATE].server_load})


async def tokenizer_info(request: web.Request) -> web.Response:
    """vLLM's GET /tokenizer_info (--enable-tokenizer-info-endpoint): the tokenizer's settings as
    its tokenizer_config.json holds them, its class, and the server's chat template."""
    state = request.app[STATE]
    tokenizer = state.require_tokenizer("tokenizer")
    config = {k: _jsonable(v) for k, v in (getattr(tokenizer, "init_kwargs", None) or {}).items()
              if k not in ("vocab_file", "merges_file")}   # the server's own file paths
    config["tokenizer_class"] = type(tokenizer).__name__
    template = state.chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        config["chat_template"] = template
    return json_response(config)


def _jsonable(value):
    """Special tokens are AddedToken objects in init_kwargs: their text is what JSON shows."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def add_routes(app: web.Application, enable_tokenizer_info: bool) -> None:
    app.router.add_get("/version", version)
    app.router.add_get("/load", load)
    if enable_tokenizer_info:  # off by default in vLLM: the template may be private
        app.router.add_get("/tokenizer_info", tokenizer_info)
