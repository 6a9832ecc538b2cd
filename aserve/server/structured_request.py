"""A request's output constraint, from whichever of OpenAI's and vLLM's fields carries it.

OpenAI: response_format {"type": "text" | "json_object" | "json_schema", "json_schema":
{"name", "schema", "strict"}}. vLLM: structured_outputs {json | regex | choice | grammar |
json_object}, and the older guided_json, guided_regex, guided_choice and guided_grammar.
At most one of them per request; anything wrong is a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Optional

from aserve.server.errors import APIError
from aserve.structured_output import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


def structured_outputs_from(response_format: Any = None, structured_outputs: Any = None,
                            **guided: Any) -> Optional[StructuredOutputsParams]:
    """The request's StructuredOutputsParams, or None when it asks for free text."""
    given = {name: value for name, value in guided.items() if value is not None}
    unknown = set(given) - set(_GUIDED)
    if unknown:
        raise APIError(400, f"{sorted(unknown)[0]} is not supported.", param=sorted(unknown)[0])
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
    except ValueError as exc:
        raise APIError(400, f"{name}: {exc}", param=name) from None


def _response_format_kind(response_format: Any) -> Optional[str]:
    if response_format is None:
        return None
    kind = _get(response_format, "type")
    if kind == "text":
        return None
    if kind not in ("json_object", "json_schema"):
        raise APIError(400, "response_format.type must be text, json_object or json_schema, "
                            f"got {kind!r}.", param="response_format")
    return kind


def _from_response_format(response_format: Any, kind: str) -> StructuredOutputsParams:
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    spec = _get(response_format, "json_schema")
    schema = _get(spec, "schema") if spec is not None else None
    if schema is None:
        raise ValueError("type json_schema needs json_schema.schema (the JSON schema).")
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
