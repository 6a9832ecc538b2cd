"""`--root-path /prefix` (vLLM's, FastAPI's root_path): a server behind a proxy that forwards
`/prefix/v1/...` answers there and at `/v1/...` alike.

aiohttp routes before any middleware runs, so every route is registered a second time under
the prefix. Code that decides by path (the API key's guard, Anthropic's error shape, the load
count) reads route_path(), the path without the prefix.
"""

from __future__ import annotations

from aiohttp import web

ROOT_PATH = web.AppKey("aserve_root_path", str)


def normalized(root_path: str) -> str:
    """"/llm", from "llm", "/llm/" or "/llm"; "" for none or "/"."""
    root = "/" + root_path.strip("/")
    return "" if root == "/" else root


def mount_under_root_path(app: web.Application, root_path: str) -> None:
    """Each route of app also at root_path + its path (call once every route is added)."""
    root = normalized(root_path)
    app[ROOT_PATH] = root
    if not root:
        return
    for route in list(app.router.routes()):
        info = route.resource.get_info()
        # A dynamic resource keeps the path as written ({model:.+}, its pattern too).
        path = getattr(route.resource, "_orig_path", None) or info.get("path") or info["formatter"]
        app.router.add_route(route.method, root + path, route.handler)


def route_path(request: web.Request) -> str:
    """The request's path as the routes know it: without the root path's prefix."""
    root = request.app.get(ROOT_PATH, "")
    path = request.path
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):] or "/"
    return path
