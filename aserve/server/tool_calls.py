"""Tool calling in chat, with OpenAI's shapes and vLLM's behaviour.

- tool_choice "none": the tools reach the chat template, the output is plain text.
- a named function ({"type": "function", "function": {"name": ...}}): the output is forced
  to JSON valid against that function's parameters and returned as its call (finish_reason
  "stop", as OpenAI and vLLM answer a forced call).
- "required": the output is forced to a JSON array of {"name", "parameters"} objects, one of
  the tools each; they become the calls (finish_reason "tool_calls").
- "auto": the model decides, through its chat template; a tool-call parser finds the calls
  in the text (--enable-auto-tool-choice --tool-call-parser hermes, as in vLLM). PARSERS is
  the seam for other formats.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

from aserve.server.errors import APIError
from aserve.structured_output import StructuredOutputsParams


@dataclass(frozen=True)
class Tool:
    name: str
    description: Optional[str]
    parameters: dict


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str          # JSON text, as OpenAI sends it
    id: str


@dataclass(frozen=True)
class ToolPlan:
    mode: str               # "none" | "auto" | "required" | "named"
    tools: list[Tool]
    constraint: Optional[StructuredOutputsParams] = None
    name: Optional[str] = None

    def template_tools(self) -> Optional[list[dict]]:
        """The tools as the chat template expects them (OpenAI's request shape)."""
        if not self.tools:
            return None
        return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                  "parameters": t.parameters}} for t in self.tools]


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


# ----------------------------------------------------------------------------- the request
def plan_tools(tools: Any, tool_choice: Any, auto_parser: Optional[str]) -> ToolPlan:
    """What a chat request's tools and tool_choice ask for (400s naming the field)."""
    parsed = _parse_tools(tools)
    if tool_choice is None:
        tool_choice = "auto" if parsed else "none"   # OpenAI's default
    if isinstance(tool_choice, str):
        if tool_choice == "none":
            return ToolPlan("none", parsed)
        if not parsed:
            raise APIError(400, f"tool_choice {tool_choice!r} needs tools.", param="tool_choice")
        if tool_choice == "auto":
            if auto_parser is None:
                raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and '
                                    '--tool-call-parser to be set on the server.', param="tool_choice")
            return ToolPlan("auto", parsed)
        if tool_choice == "required":
            return ToolPlan("required", parsed, StructuredOutputsParams(json=_required_schema(parsed)))
        raise APIError(400, "tool_choice must be none, auto, required or a named function, got "
                            f"{tool_choice!r}.", param="tool_choice")
    name = _named_choice(tool_choice)
    match = [t for t in parsed if t.name == name]
    if not match:
        raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools.",
                       param="tool_choice")
    return ToolPlan("named", parsed, StructuredOutputsParams(json=match[0].parameters), name)


def _parse_tools(tools: Any) -> list[Tool]:
    if tools is None:
        return []
    parsed, names = [], set()
    for index, tool in enumerate(_plain(tools)):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise APIError(400, f"tools[{index}] must be {{\"type\": \"function\", \"function\": {{...}}}}.",
                           param="tools")
        name = function.get("name")
        if not isinstance(name, str) or not name or name in names:
            raise APIError(400, f"tools[{index}].function.name must be a unique, non-empty string.",
                           param="tools")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise APIError(400, f"tools[{index}].function.parameters must be a JSON schema object.",
                           param="tools")
        names.add(name)
        parsed.append(Tool(name, function.get("description"), parameters))
    return parsed


def _named_choice(tool_choice: Any) -> str:
    choice = _plain(tool_choice)
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise APIError(400, 'a named tool_choice is {"type": "function", "function": {"name": ...}}.',
                       param="tool_choice")
    return name


def _required_schema(tools: list[Tool]) -> dict:
    """A JSON array of one or more calls, each naming one tool with parameters valid for it."""
    call = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.name]},
                                               "parameters": t.parameters},
             "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    return {"type": "array", "minItems": 1, "items": {"anyOf": call}}


# ----------------------------------------------------------------------------- the output
def calls_from_output(plan: ToolPlan, text: str) -> tuple[Optional[str], list[ToolCall]]:
    """(the message content, the tool calls) of a finished output under plan."""
    if plan.mode == "named":
        return None, [ToolCall(plan.name, text, new_call_id())]
    if plan.mode == "required":
        try:
            items = json.loads(text)
        except ValueError:   # cut off by max_tokens: no call could be formed
            return text, []
        return None, [ToolCall(i["name"], json.dumps(i["parameters"], ensure_ascii=False), new_call_id())
                      for i in items]
    if plan.mode == "auto":
        return PARSERS["hermes"](text)
    return text, []


def parse_hermes(text: str) -> tuple[Optional[str], list[ToolCall]]:
    """Hermes-style calls (Qwen2.5, Hermes, many others): <tool_call>{"name": ...,
    "arguments": {...}}</tool_call> blocks; the text before the first is the content."""
    if "<tool_call>" not in text:
        return text, []
    calls = []
    for body in _HERMES.findall(text):
        try:
            call = json.loads(body)
            calls.append(ToolCall(call["name"], json.dumps(call.get("arguments", {}), ensure_ascii=False),
                                  new_call_id()))
        except (ValueError, KeyError, TypeError):
            return text, []   # not a well-formed call: the text is plain content
    content = text[:text.index("<tool_call>")].strip()
    return (content or None), calls


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

# --tool-call-parser NAME -> a function of the finished text: (content, calls).
PARSERS: dict[str, Callable[[str], tuple[Optional[str], list[ToolCall]]]] = {"hermes": parse_hermes}


def _plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        return dump(exclude_none=True)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
