"""Tool calling in chat, with OpenAI's shapes and vLLM's behaviour.

- tool_choice "none": the tools reach the chat template, the output is plain text.
- a named function ({"type": "function", "function": {"name": ...}}): the output is forced
  to JSON valid against that function's parameters and returned as its call.
- "required": the output is forced to a JSON array of {"name", "parameters"} objects, one of
  the tools each; they become the calls.
- "auto": the model decides, through its chat template; a tool-call parser finds the calls
  in the text (--enable-auto-tool-choice --tool-call-parser hermes, as in vLLM).
  tool_parsers.PARSERS is the seam for other formats.
A choice that made calls ends with finish_reason "tool_calls" (vLLM's streamed answer; its
unstreamed one says "stop" for forced calls: one answer for both here), unless max_tokens cut
it off ("length"). Call ids are "chatcmpl-tool-<hex>", as vLLM's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from aserve.server.errors import APIError
from aserve.server.streaming import request_failed
from aserve.server.tool_parsers import (PARSERS, Delta, ToolCall, ToolParser, call_arguments, call_header,
                                        new_call_id)
from aserve.structured_output import StructuredOutputsParams


@dataclass(frozen=True)
class Tool:
    name: str
    description: Optional[str]
    parameters: dict


@dataclass(frozen=True)
class ToolPlan:
    mode: str               # "none" | "auto" | "required" | "named"
    tools: list[Tool]
    constraint: Optional[StructuredOutputsParams] = None
    name: Optional[str] = None     # the named function
    parser: Optional[str] = None   # "auto": the --tool-call-parser

    def template_tools(self) -> Optional[list[dict]]:
        """The tools as the chat template expects them (OpenAI's request shape)."""
        if not self.tools:
            return None
        return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                  "parameters": t.parameters}} for t in self.tools]


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
            return ToolPlan("auto", parsed, parser=auto_parser)
        if tool_choice == "required":
            return ToolPlan("required", parsed, _constraint(_required_schema(parsed)))
        raise APIError(400, "tool_choice must be none, auto, required or a named function, got "
                            f"{tool_choice!r}.", param="tool_choice")
    name = _named_choice(tool_choice)
    match = [t for t in parsed if t.name == name]
    if not match:
        raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools.",
                       param="tool_choice")
    return ToolPlan("named", parsed, _constraint(match[0].parameters), name)


def _constraint(schema: dict) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(json=schema)
    except ValueError as exc:   # e.g. a schema too large to compile per request
        raise APIError(400, f"tools: {exc}", param="tools") from None


def _parse_tools(tools: Any) -> list[Tool]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list of functions.", param="tools")
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
    """A JSON array of one or more calls, each naming one tool with parameters valid for it.
    Each tool's $defs move to the top, where its "#/$defs/..." references now point (as vLLM)."""
    defs: dict = {}
    calls = []
    for tool in tools:
        parameters = dict(tool.parameters)
        for name, definition in (parameters.pop("$defs", None) or {}).items():
            if defs.setdefault(name, definition) != definition:
                raise APIError(400, f"tools: the $defs entry {name!r} of {tool.name!r} differs from another "
                                    "tool's of the same name.", param="tools")
        calls.append({"type": "object", "properties": {"name": {"type": "string", "enum": [tool.name]},
                                                        "parameters": parameters},
                      "required": ["name", "parameters"], "additionalProperties": False})
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if defs:
        schema["$defs"] = defs
    return schema


def template_messages(conversation: list[dict], messages: list) -> list[dict]:
    """The conversation with each message's tool_calls and tool_call_id, as chat templates
    take them: like vLLM, a call's arguments (JSON text on the wire) become an object, which
    templates such as Qwen's and Hermes' write out with tojson."""
    for msg, message in zip(conversation, messages):
        if message.tool_call_id is not None:
            msg["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            msg["tool_calls"] = [_history_call(i, call) for i, call in enumerate(_plain(message.tool_calls))]
    return conversation


def _history_call(index: int, call: Any) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError(400, f"messages: tool_calls[{index}] must be {{\"id\", \"type\": \"function\", "
                            "\"function\": {\"name\", \"arguments\"}}.", param="messages")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass   # not JSON: the template gets the text as sent
    return {"id": call.get("id"), "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}


# ----------------------------------------------------------------------------- the output
def calls_from_output(plan: ToolPlan, text: str) -> tuple[Optional[str], list[ToolCall]]:
    """(the message content, the tool calls) of a finished output under plan. A forced call's
    message has content "", as vLLM answers (clients test its length)."""
    if plan.mode == "named":
        return "", [ToolCall(plan.name, text, new_call_id())]
    if plan.mode == "required":
        try:
            return "", [ToolCall(i["name"], json.dumps(i["parameters"], ensure_ascii=False), new_call_id())
                        for i in json.loads(text)]
        except (ValueError, KeyError, TypeError):
            # Cut off (max_tokens, a stop string): no calls, and no content either, as vLLM
            # answers and as this choice's stream sent (its text is the calls' unfinished JSON).
            return "", []
    if plan.mode == "auto":
        return PARSERS[plan.parser](plan.tools).extract(text)
    return text, []


def keep_special_tokens_for_parser(plan: ToolPlan, params) -> None:
    """A parser whose marker is a special token (Mistral's [TOOL_CALLS]) must see it in the
    text: the request then keeps special tokens, as vLLM's adjust_request sets it."""
    if plan.mode == "auto" and PARSERS[plan.parser].keeps_special_tokens:
        params.skip_special_tokens = False


def response_message(plan: ToolPlan, text: str, finish: Optional[str]
                     ) -> tuple[Optional[str], list[dict], Optional[str]]:
    """(content, tool_calls in OpenAI's shape, finish_reason) of a finished choice's message."""
    content, calls = calls_from_output(plan, text)
    tool_calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                  for c in calls]
    return content, tool_calls, finish_reason(plan, finish, bool(calls))


def finish_reason(plan: ToolPlan, finish: Optional[str], called: bool) -> Optional[str]:
    """OpenAI's (and vLLM's): "tool_calls" when the model ended by making calls of its own
    choosing ("auto") or of a "required" choice, but "stop" for a call to a named function;
    a cut-off stays "length"."""
    return "tool_calls" if called and finish == "stop" and plan.mode != "named" else finish


async def streamed_tool_deltas(plan: ToolPlan, stream) -> AsyncIterator[tuple[Any, Delta]]:
    """A one-choice request stream through plan's tool parser: each output with what it adds
    (answer text and call fragments), the parser's held-back rest with the final output.
    (/v1/responses and /v1/messages stream their items and blocks from it.)"""
    parser, sent = choice_stream(plan), 0
    async for final in stream:
        if final.error:
            raise request_failed(final.error)
        out = final.outputs[0]
        delta = parser.feed(out.text[sent:])
        sent = len(out.text)
        if out.finish_reason is not None:
            rest = parser.finish()
            delta.content += rest.content
            delta.tool_calls += rest.tool_calls
        yield final, delta


def choice_stream(plan: ToolPlan) -> Optional[ToolParser]:
    """The per-choice stream transformer for plan, or None when the text is plain content."""
    if plan.mode == "named":
        return _NamedStream(plan.name)
    if plan.mode == "required":
        return _RequiredStream()
    if plan.mode == "auto":
        return PARSERS[plan.parser](plan.tools)
    return None


class _NamedStream(ToolParser):
    """A forced call: the whole output is the arguments of one call to the named function."""

    def __init__(self, name: str) -> None:
        self._name, self._sent = name, False

    @property
    def called(self) -> bool:
        return self._sent

    def feed(self, text: str) -> Delta:
        if not text:
            return Delta()
        if not self._sent:
            self._sent = True
            return Delta(tool_calls=[call_header(0, self._name, text)])
        return Delta(tool_calls=[call_arguments(0, text)])

    def finish(self) -> Delta:
        return Delta()


class _RequiredStream(ToolParser):
    """tool_choice "required": the output is a JSON array of {"name", "parameters"} objects
    (the grammar's shape, name first). A character scanner sends each call's header once its
    name is complete, then the text of its parameters as it arrives."""

    def __init__(self) -> None:
        self._depth = 0                    # [ and { open outside strings (2: a call object)
        self._in_string = self._escape = False
        self._reading = False              # the string is a key or value of the call object
        self._string = ""
        self._key: Optional[str] = None
        self._after_colon = False
        self._capturing = self._args_started = False   # inside the "parameters" value
        self._args: list[str] = []
        self._index, self._name, self._header_sent, self._held = -1, None, False, ""
        self._num_sent = 0

    @property
    def called(self) -> bool:
        return self._num_sent > 0

    def feed(self, text: str) -> Delta:
        out = Delta()
        for ch in text:
            self._step(ch, out)
        self._send_args(out)
        return out

    def finish(self) -> Delta:
        return Delta()

    def _step(self, ch: str, out: Delta) -> None:
        if self._capturing and not self._in_string and self._depth == 2 and ch in ",}":
            self._capturing = False        # the parameters value ended
            self._send_args(out)
        if self._capturing and (self._args_started or not ch.isspace()):
            self._args_started = True
            self._args.append(ch)
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                if self._reading:
                    self._end_string(out)
                return
            if self._reading:
                self._string += ch
            return
        if ch == '"':
            self._in_string, self._string = True, ""
            self._reading = self._depth == 2 and not self._capturing
        elif ch in "[{":
            self._depth += 1
            if self._depth == 2:           # a new call
                self._index += 1
                self._name, self._key, self._header_sent, self._held = None, None, False, ""
                self._after_colon = False
        elif ch in "]}":
            self._depth -= 1
        elif self._depth == 2 and not self._capturing:
            if ch == ":":
                self._after_colon = True
                if self._key == "parameters":
                    self._capturing, self._args_started = True, False
            elif ch == ",":
                self._after_colon, self._key = False, None

    def _end_string(self, out: Delta) -> None:
        value = json.loads('"' + self._string + '"')   # undoes the escapes
        if not self._after_colon:
            self._key = value
            return
        self._after_colon = False
        if self._key == "name":
            self._name = value
            self._send_args(out)           # the header goes out now

    def _send_args(self, out: Delta) -> None:
        text = "".join(self._args)
        self._args.clear()
        if self._name is None:             # parameters before the name: held for the header
            self._held += text
        elif not self._header_sent:
            out.tool_calls.append(call_header(self._index, self._name, self._held + text))
            self._header_sent, self._held = True, ""
            self._num_sent += 1
        elif text:
            out.tool_calls.append(call_arguments(self._index, text))


def _plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        return dump(exclude_none=True)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
