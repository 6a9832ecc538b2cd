"""Cross-origin requests (CORS), as vLLM's server answers them: by default any origin may call
the API from a browser (--allowed-origins '["*"]', --allowed-methods, --allowed-headers,
--allow-credentials, vLLM's flags with vLLM's defaults).

A request with an Origin header gets Access-Control-Allow-Origin on its answer (errors and
streams included: the headers go on at prepare time), "*" when every origin is allowed and no
credentials are, else the origin itself (with Vary: Origin). A preflight (OPTIONS with
Access-Control-Request-Method) is answered here, before the API key is asked for: 200 with the
allowed methods and headers, or 400 naming what is not allowed, as Starlette's middleware in
vLLM answers it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
_MAX_AGE = "600"


@dataclass(frozen=True)
class CorsPolicy:
    origins: tuple[str, ...] = ("*",)
    methods: tuple[str, ...] = ("*",)
    headers: tuple[str, ...] = ("*",)
    credentials: bool = False
    _upper_methods: frozenset = field(init=False, repr=False, default=frozenset())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_upper_methods", frozenset(m.upper() for m in self.methods))

    @property
    def any_origin(self) -> bool:
        return "*" in self.origins

    def allows_origin(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    def allows_method(self, method: str) -> bool:
        return "*" in self.methods or method.upper() in self._upper_methods

    def allows_headers(self, requested: str) -> bool:
        if "*" in self.headers:
            return True
        allowed = {h.lower() for h in self.headers}
        return all(h.strip().lower() in allowed for h in requested.split(",") if h.strip())

    def origin_headers(self, origin: str) -> dict[str, str]:
        """The headers an answer to this origin carries (none for an origin not allowed)."""
        if not self.allows_origin(origin):
            return {}
        if self.any_origin and not self.credentials:
            return {"Access-Control-Allow-Origin": "*"}
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if self.credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers


def cors_middleware(policy: CorsPolicy):
    @web.middleware
    async def cors(request: web.Request, handler):
        origin = request.headers.get("Origin")
        wanted = request.headers.get("Access-Control-Request-Method")
        if request.method != "OPTIONS" or origin is None or wanted is None:
            return await handler(request)
        # A preflight: answered here, whatever the route (the key is not asked for).
        refused = []
        if not policy.allows_origin(origin):
            refused.append("origin")
        if not policy.allows_method(wanted):
            refused.append("method")
        requested_headers = request.headers.get("Access-Control-Request-Headers", "")
        if not policy.allows_headers(requested_headers):
            refused.append("headers")
        headers = {"Access-Control-Allow-Methods": ", ".join(
                       ALL_METHODS if "*" in policy.methods else policy.methods),
                   "Access-Control-Max-Age": _MAX_AGE,
                   "Access-Control-Allow-Headers": (requested_headers if "*" in policy.headers
                                                    else ", ".join(policy.headers)),
                   **(policy.origin_headers(origin) or {"Vary": "Origin"})}
        if refused:
            return web.Response(status=400, text="Disallowed CORS " + ", ".join(refused), headers=headers)
        return web.Response(status=200, text="OK", headers=headers)

    return cors


def cors_headers_on_prepare(policy: CorsPolicy):
    """on_response_prepare: the origin's headers on every answer, streams and errors included."""
    async def add(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and "Access-Control-Allow-Origin" not in response.headers:
            response.headers.update(policy.origin_headers(origin))
    return add
