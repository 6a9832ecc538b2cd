"""A request's output constraint, from whichever of OpenAI's and vLLM's fields carries it.

OpenAI: response_format {"type": "text" | "json_object" | "json_schema", "json_schema":
{"name", "schema", "strict"}}. vLLM: structured_outputs {json | regex | choice | grammar |
json_object | structural_tag}, response_format {"type": "structural_tag", "structures",
"triggers"}, and the older guided_json, guided_regex, guided_choice and guided_grammar.
At most one of them per request; anything wrong is a 400 naming the field. vLLM options aserve
does not honour (guided_whitespace_pattern, another guided_decoding_backend) are
refused by name rather than ignored: a client relying on them would get output it did not ask
for.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Optional

from aserve.server.errors import APIError
from aserve.structured_output import StructuredOutputsParams

if TYPE_CHECKING:
    from aserve.server.app import ServerState

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
# vLLM's request fields about structured outputs that aserve does not support, with why.
_UNSUPPORTED = {
    "guided_whitespace_pattern": "aserve's grammar backend (llguidance) takes no whitespace pattern; "
                                 "use structured_outputs.disable_any_whitespace",
}
# guided_decoding_backend names the engine's own backend, or is refused as vLLM refuses a
# backend other than the one it was started with.
_OWN_BACKEND = ("guidance", "llguidance", "auto")
# The request fields this module reads (the protocol declares them on both routes).
FIELDS = ("response_format", "structured_outputs", *_GUIDED, *_UNSUPPORTED, "guided_decoding_backend")


def structured_outputs_from(response_format: Any = None, structured_outputs: Any = None,
                            **guided: Any) -> Optional[StructuredOutputsParams]:
    """The request's StructuredOutputsParams, or None when it asks for free text."""
    given = {name: value for name, value in guided.items() if value is not None}
    backend = given.pop("guided_decoding_backend", None)
    if backend is not None and backend not in _OWN_BACKEND:
        raise APIError(400, f"guided_decoding_backend {backend!r} is not available: this server's "
                            "structured outputs use llguidance ('guidance'); leave the field out.",
                       param="guided_decoding_backend")
    for name in sorted(given):
        if name in _UNSUPPORTED:
            raise APIError(400, f"{name} is not supported: {_UNSUPPORTED[name]}.", param=name)
        if name not in _GUIDED:
            raise APIError(400, f"{name} is not supported.", param=name)
    fields = dict(given)
    if structured_outputs is not None:
        fields["structured_outputs"] = structured_outputs
    constraint_format = _response_format_kind(response_format)
    if constraint_format is not None:
        fields["response_format"] = response_format
    if len(fields) > 1:
        names = sorted(fields)
        raise APIError(400, f"give one output constraint, got {', '.join(names)}.", param=names[1])
    if not fields:
        return None
    (name, value), = fields.items()
    try:
        if name == "structured_outputs":
            return StructuredOutputsParams.from_any(_plain(value))
        if name == "response_format":
            return _from_response_format(value, constraint_format)
        return StructuredOutputsParams(**{_GUIDED[name]: _plain(value)})
    except (ValueError, TypeError) as exc:
        raise APIError(400, f"{name}: {exc}", param=name) from None


def structured_outputs_of(request: Any) -> Optional[StructuredOutputsParams]:
    """structured_outputs_from() on a request model's fields (those it declares)."""
    return structured_outputs_from(**{name: getattr(request, name, None) for name in FIELDS})


def request_constraint(request: Any, tool_constraint: Optional[StructuredOutputsParams] = None
                       ) -> Optional[StructuredOutputsParams]:
    """The one constraint of a request: its own fields', or the one its tool_choice forces."""
    own = structured_outputs_of(request)
    if own is not None and tool_constraint is not None:
        field = constraint_field(request)
        raise APIError(400, f"{field} cannot be combined with a named or \"required\" tool_choice, "
                            "which constrains the output itself.", param=field)
    return own if own is not None else tool_constraint


def constraint_field(request: Any) -> str:
    """The name of the field that carries a request's constraint (for its errors)."""
    for name in FIELDS:
        value = getattr(request, name, None)
        if value is not None and name != "guided_decoding_backend" and (
                name != "response_format" or _get(value, "type") != "text"):
            return name
    return "tool_choice"   # a tool call's constraint


async def check_grammar(state: "ServerState", params: Any, param: str) -> None:
    """Compile the request's grammar against the tokenizer now, in the grammar backend's
    threads: a schema, regex or grammar that parses but cannot be compiled is a 400 before
    anything is streamed, never a failure inside the engine. In one process the engine's own
    check of the same grammar is then a cache hit, so the engine thread never waits for a
    compile; an engine process compiles its own copy (the server's is the EngineView's)."""
    so = getattr(params, "structured_outputs", None)
    if so is None:
        return
    grammars = getattr(state.async_engine.engine, "grammars", None)
    if grammars is None:
        raise APIError(400, "Structured outputs need a tokenizer, and this server runs without one "
                            "(--skip-tokenizer-init).", param=param)
    if grammars.is_validated(so):   # a schema seen before: no thread hop
        return
    try:
        await asyncio.wrap_future(grammars.validate(so))
    except ValueError as exc:
        raise APIError(400, f"{param}: {exc}", param=param) from None


def _response_format_kind(response_format: Any) -> Optional[str]:
    if response_format is None:
        return None
    kind = _get(response_format, "type")
    if kind == "text":
        return None
    if kind not in ("json_object", "json_schema", "structural_tag"):
        raise APIError(400, "response_format.type must be text, json_object, json_schema or structural_tag, "
                            f"got {kind!r}.", param="response_format")
    return kind


def _from_response_format(response_format: Any, kind: str) -> StructuredOutputsParams:
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "structural_tag":   # vLLM's: {"type", "structures", "triggers"}
        return StructuredOutputsParams(structural_tag={k: v for k, v in _plain(response_format).items()
                                                       if k != "type"})
    spec = _get(response_format, "json_schema")
    schema = _get(spec, "schema") if isinstance(spec, dict) else None
    if schema is None:
        # vLLM's words (clients' tests match them), and where the schema goes.
        raise ValueError("When response_format type is 'json_schema', the 'json_schema' field must be "
                         "provided, with the JSON schema as json_schema.schema.")
    return StructuredOutputsParams(json=_plain(schema))


def _get(obj: Any, key: str) -> Any:
    """A field of a pydantic model or of a dict (the protocol may hand either)."""
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _plain(value: Any) -> Any:
    """pydantic models and their dicts as plain JSON-like values."""
    dump = getattr(value, "model_dump", None)
    return dump(exclude_none=True, by_alias=True) if dump is not None else value
