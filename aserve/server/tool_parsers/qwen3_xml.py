"""Qwen3-Coder's XML calls (vLLM's --tool-call-parser qwen3_coder, and qwen3_xml), and Seed-OSS's,
the same inside <seed:tool_call> (seed_oss):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

The values are text; each is typed by the tool's JSON schema (a number, a boolean, an object
written as JSON), as vLLM types them; a parameter the schema does not know stays a string."""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

from aserve.server.tool_parsers.base import CallBlockParser, ParsedCalls, partial_suffix

_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL)


class Qwen3XmlToolParser(CallBlockParser):
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    FUNCTION, FUNCTION_END = "<function=", "</function>"

    def find_start(self, text: str) -> tuple[int, int]:
        starts = [i for i in (text.find(self.OPEN), text.find(self.FUNCTION)) if i >= 0]
        if starts:
            return min(starts), 0
        return -1, max(partial_suffix(text, self.OPEN), partial_suffix(text, self.FUNCTION))

    def parse_calls(self, body: str, final: bool) -> ParsedCalls:
        calls, consumed = [], 0
        while True:
            pos = self._skip_tags(body, consumed)
            if pos == len(body):   # the wrappers after a call go with it; alone, they are kept
                return ParsedCalls(calls, pos if calls else consumed)
            if not body.startswith(self.FUNCTION, pos):
                waiting = not final and any(t.startswith(body[pos:]) for t in (self.OPEN, self.CLOSE, self.FUNCTION))
                return ParsedCalls(calls, consumed, valid=waiting)
            end = body.find(self.FUNCTION_END, pos)
            if end < 0 and not final:
                return ParsedCalls(calls, consumed)
            block = body[pos + len(self.FUNCTION):end if end >= 0 else len(body)]
            name, bracket, params = block.partition(">")
            name = name.strip()
            if not bracket or not name:
                return ParsedCalls(calls, consumed, valid=False)
            calls.append((name, json.dumps(self._arguments(name, params), ensure_ascii=False)))
            consumed = end + len(self.FUNCTION_END) if end >= 0 else len(body)

    def _skip_tags(self, body: str, pos: int) -> int:
        """Past whitespace and the <tool_call> / </tool_call> wrappers."""
        while True:
            while pos < len(body) and body[pos].isspace():
                pos += 1
            for tag in (self.OPEN, self.CLOSE):
                if body.startswith(tag, pos):
                    pos += len(tag)
                    break
            else:
                return pos

    def _arguments(self, name: str, params: str) -> dict:
        properties = (self.tool_schemas.get(name) or {}).get("properties") or {}
        arguments = {}
        for key, raw in _PARAMETER.findall(params):
            key = key.strip()
            value = raw[1:] if raw.startswith("\n") else raw
            value = value[:-1] if value.endswith("\n") else value
            arguments[key] = typed_value(value, properties.get(key))
        return arguments


def typed_value(text: str, schema: Any) -> Any:
    """A parameter's text as its schema's type says (the text itself where it does not parse)."""
    if not isinstance(schema, dict):
        return text
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "string":
        return text
    stripped = text.strip()
    if stripped.lower() == "null":
        return None
    try:
        if kind == "integer":
            return int(stripped)
        if kind == "number":
            if stripped.lstrip("+-").isdigit():
                return int(stripped)
            number = float(stripped)
            return number if math.isfinite(number) else text   # JSON has no inf or nan
    except ValueError:
        return text
    if kind == "boolean":
        return stripped.lower() == "true" if stripped.lower() in ("true", "false") else text
    # An object, an array, or no single type (anyOf, an enum): JSON, else a Python literal.
    try:
        return json.loads(stripped)
    except ValueError:
        try:
            return ast.literal_eval(stripped)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return text


class SeedOssToolParser(Qwen3XmlToolParser):
    """Seed-OSS-36B: Qwen3-Coder's calls inside <seed:tool_call> ... </seed:tool_call>."""

    OPEN, CLOSE = "<seed:tool_call>", "</seed:tool_call>"
