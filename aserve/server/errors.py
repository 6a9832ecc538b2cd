"""The API's errors: APIError carries status and OpenAI's error body; bodies are parsed here.

Every failure a client can cause becomes an APIError at the door, and leaves as OpenAI's
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import orjson
from pydantic import BaseModel, ValidationError

from aserve.engine.async_engine import EngineDeadError, RequestAbortedError
from aserve.sampling_params import SamplingParams
from aserve.server.json_body import loads_fast, with_exact_integers



# An empty or missing prompt: vLLM's server words it as the first sentence (newer versions,
# where prompt_embeds may replace the prompt), its engine as the second (older ones); clients'
# tests match either.
EMPTY_PROMPT = ("Either prompt or prompt_embeds must be provided and non-empty: the decoder prompt "
                "cannot be empty.")

class APIError(Exception):
    """An error for the client, carried to the door and written as OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers   # e.g. Retry-After on a 503
        self.close = close       # the connection cannot carry another request (a broken body)

    def body(self) -> bytes:
        return orjson.dumps(ErrorResponse(error=ErrorInfo(
            message=self.message, type=self.type, param=self.param, code=self.code)).model_dump())

    def anthropic_body(self) -> bytes:
        """Anthropic's error body (the /v1/messages routes): its error types go by status."""
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": self.message}})


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}
ANTHROPIC_PATHS = "/v1/messages"   # the routes whose errors take Anthropic's shape (a prefix)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def api_error_from(exc: BaseException) -> Optional[APIError]:
    """The client's answer for an exception a handler may meet; None for a bug (a 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), type="server_error", code="engine_dead")
    if isinstance(exc, RequestAbortedError):  # ended by the server (shutting down), not the client
        return APIError(503, str(exc), type="server_error", code=exc.code)
    return None


# The SamplingParams fields a request body may set: not those the engine fills, nor output_kind,
# which the server sets from the request's stream flag.
SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__) - {"all_stop_token_ids", "bad_words_token_ids",
                                                              "output_kind"}


def bad_request_from_value_error(exc: ValueError) -> APIError:
    """SamplingParams and the engine word their errors '<field> must ...': name that field
    (a sampling field, or the prompt)."""
    message = str(exc)
    first = message.split(" ", 1)[0]
    param = first if first in SAMPLING_FIELDS or first == "prompt" else None
    code = "context_length_exceeded" if "maximum context length" in message else None
    return APIError(400, message, param=param, code=code)


def check_json_content_type(content_type: Optional[str]) -> None:
    """A body sent with a content type other than JSON is a 400, as vLLM answers (a form post
    of a JSON text is a client's mistake). No content type at all is accepted: scripts that
    send none exist, and the body must still be JSON."""
    if not content_type:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type and media_type != "application/json":
        raise APIError(400, f"Unsupported Media Type: {media_type!r}. Only 'application/json' is "
                            "allowed: send the body as JSON with Content-Type: application/json.",
                       code="unsupported_media_type")


def parse_request(raw: bytes, model_cls: type[BaseModel],
                  precheck: Optional[Callable[[dict], None]] = None) -> Any:
    """Parse a JSON body into model_cls, turning every failure into a 400 with OpenAI's shape.
    precheck(body) sees the parsed JSON object before validation (cheap early refusals).
    Integers stay exact however large (json_body), so range checks see them."""
    try:
        data = loads_fast(raw)
    except ValueError as exc:  # orjson.JSONDecodeError is one
        raise APIError(400, f"We could not parse the JSON body of your request: {exc}.") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    if precheck is not None:
        # Before the exact-integer pass, which scans the whole body: a giant prompt (10 MB) is
        # refused without that pass holding the event loop (its integers cannot matter).
        precheck(data)
    try:
        exact = with_exact_integers(raw, data)
    except ValueError as exc:  # a too-long integer
        raise APIError(400, f"We could not parse the JSON body of your request: {exc}.") from None
    if exact is not data and precheck is not None:
        precheck(exact)  # parsed anew: its own checks and early cuts (rare: 19-digit runs only)
    data = exact
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise _from_validation_error(exc) from None


def _from_validation_error(exc: ValidationError) -> APIError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    param = loc[0] if loc else None
    if err["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{'.'.join(loc)}'.", param=param)
    if param == "prompt" and len(err["loc"]) >= 2:  # a union: pydantic reports every member
        return APIError(400, "'prompt' must be a string, a list of strings, a list of token ids "
                             "or a list of lists of token ids.", param=param)
    where = ".".join(p for p in loc if not any(c in p for c in "[]"))  # drop union-member tags
    got = repr(err.get("input"))[:80]
    return APIError(400, f"Invalid value for '{where}': {err['msg']} (got {got}).", param=param)
