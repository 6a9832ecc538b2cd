"""StructuredOutputsParams: what a request's output must match, with vLLM's names.

vLLM 0.10+ calls it StructuredOutputsParams (SamplingParams.structured_outputs); earlier
versions GuidedDecodingParams (SamplingParams.guided_decoding): both names are accepted.
Exactly one kind of constraint per request.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# Bounds at the door: a schema or grammar is compiled per request, so its size is bounded.
MAX_SPEC_CHARS = 256 * 1024
MAX_CHOICES = 1024


@dataclass
class StructuredOutputsParams:
    """json: a JSON schema (dict or JSON text); regex: a regular expression; choice: the
    output is exactly one of these strings; grammar: a Lark or GBNF/EBNF grammar;
    json_object: any JSON object; structural_tag: vLLM's (JSON text or a dict) {"structures":
    [{"begin", "schema", "end"}], "triggers": [...]}: free text, in which each trigger starts
    one of the structures that begin with it, whose body follows its JSON schema."""

    json: Optional[Union[str, dict]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Optional[Union[str, dict]] = None
    disable_any_whitespace: bool = False
    # The server's, never a request's: the grammar starts once this token has been generated
    # (a reasoning model's </think>, server/reasoning.py); until then the output is free.
    after_token_id: Optional[int] = None
    # Filled by __post_init__: the one kind set, and its spec as text (the cache key).
    kind: str = field(init=False, default="")
    spec: str = field(init=False, default="", repr=False)

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, grammar, "
                             f"json_object or structural_tag, got {given or 'none'}.")
        self.kind = given[0]
        self.spec = _spec_text(self.kind, getattr(self, self.kind))
        if len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs.{self.kind} is too long: at most {MAX_SPEC_CHARS} "
                             f"characters, got {len(self.spec)}.")

    @classmethod
    def from_any(cls, value: Any) -> "StructuredOutputsParams":
        """From an instance or a mapping of its fields (vLLM's JSON body shape)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be an object, got {type(value).__name__}.")
        # vLLM's disable_fallback asks not to fall back to another backend: there is none.
        value = {k: v for k, v in value.items() if k != "disable_fallback"}
        unknown = set(value) - {f for f in cls.__dataclass_fields__ if f not in ("kind", "spec", "after_token_id")}
        if unknown:
            raise ValueError(f"structured_outputs has unknown fields: {', '.join(sorted(unknown))}.")
        return cls(**value)


GuidedDecodingParams = StructuredOutputsParams   # vLLM's earlier name


def _spec_text(kind: str, value: Any) -> str:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = _json.loads(value)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        if not isinstance(value, (dict, bool)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object).")
        # Key order kept: the grammar writes an object's properties in the schema's order.
        return _json.dumps(value)
    if kind == "choice":
        if (not isinstance(value, list) or not value or len(value) > MAX_CHOICES
                or not all(isinstance(c, str) and c for c in value)):
            raise ValueError(f"structured_outputs.choice must be a list of 1 to {MAX_CHOICES} "
                             f"non-empty strings.")
        return _json.dumps(value)
    if kind == "json_object":
        if value is not True:
            raise ValueError("structured_outputs.json_object must be true.")
        return "true"
    if kind == "structural_tag":
        return _json.dumps(_structural_tag(value))
    if not isinstance(value, str) or not value:
        raise ValueError(f"structured_outputs.{kind} must be a non-empty string.")
    return value


def _structural_tag(value: Any) -> dict:
    """vLLM's structural tag as {"structures": [{"begin", "schema", "end"}], "triggers"}, each
    structure's begin starting with one of the triggers."""
    where = "structured_outputs.structural_tag"
    if isinstance(value, str):
        try:
            value = _json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object with structures and triggers.")
    if "format" in value and "structures" not in value:
        raise ValueError(f"{where}: the 'format' form (xgrammar's) is not supported; give "
                         "structures [{begin, schema, end}] and triggers.")
    structures, triggers = value.get("structures"), value.get("triggers")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise ValueError(f"{where}.triggers must be a list of non-empty strings.")
    if not isinstance(structures, list) or not structures:
        raise ValueError(f"{where}.structures must be a non-empty list of {{begin, schema, end}}.")
    for index, item in enumerate(structures):
        if (not isinstance(item, dict) or not isinstance(item.get("begin"), str)
                or not isinstance(item.get("end"), str) or not isinstance(item.get("schema"), (dict, bool))):
            raise ValueError(f"{where}.structures[{index}] must be {{\"begin\": str, \"schema\": "
                             "a JSON schema, \"end\": str}.")
        if not any(item["begin"].startswith(t) for t in triggers):
            raise ValueError(f"{where}.structures[{index}].begin {item['begin']!r} starts with none of "
                             f"the triggers {triggers}.")
    return {"structures": [{"begin": s["begin"], "schema": s["schema"], "end": s["end"]} for s in structures],
            "triggers": list(triggers)}
