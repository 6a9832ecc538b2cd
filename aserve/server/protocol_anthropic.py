"""The body of POST /v1/messages (Anthropic's Messages API, which vLLM also serves) and what it
asks of the engine: the conversation as chat messages, the sampling params, the tools.

Content blocks: text; an assistant's tool_use (a tool call, its input an object); a user's
tool_result (a "tool" message answering the call); thinking blocks of earlier turns are
dropped, as templates take no thinking back; system messages inside `messages` join the
system prompt. vLLM's extras: chat_template_kwargs, and output_config.effort as the template's
reasoning_effort. Images and documents (no multi-modal models),
and Anthropic's server tools (web search, code execution...), are a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict

from aserve.models.generation_config import sampling_fields
from aserve.sampling_params import SamplingParams
from aserve.server.errors import APIError, bad_request_from_value_error
from aserve.server.protocol import output_kind_for
from aserve.server.tool_calls import ToolPlan, plan_tools
from aserve.structured_output import StructuredOutputsParams

_ROLES = ("user", "assistant")
_SKIPPED_BLOCKS = ("thinking", "redacted_thinking")


class MessagesRequest(BaseModel):
    # Strict: a string where a number belongs is a 400; unknown fields are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    messages: list[Any]
    max_tokens: int
    system: Optional[Union[str, list[Any]]] = None
    stop_sequences: Optional[list[str]] = None
    stream: Optional[bool] = False
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    metadata: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[dict[str, Any]] = None
    thinking: Optional[dict[str, Any]] = None   # with --reasoning-parser the thinking comes back
    output_config: Optional[dict[str, Any]] = None   # format: a JSON schema the answer must follow
    seed: Optional[int] = None   # not Anthropic's: as on the OpenAI routes, a reproducible sample
    chat_template_kwargs: Optional[dict[str, Any]] = None   # vLLM's extra: more template variables

    def template_kwargs(self) -> Optional[dict[str, Any]]:
        """The template's extra variables: chat_template_kwargs, and output_config.effort as
        `reasoning_effort` (vLLM maps it so), which the request's own kwargs override."""
        effort = (self.output_config or {}).get("effort")
        if effort is None:
            return self.chat_template_kwargs
        if not isinstance(effort, str):
            raise APIError(400, f"output_config.effort must be a string such as \"low\" or \"high\", got "
                                f"{effort!r}.", param="output_config")
        return {"reasoning_effort": effort, **(self.chat_template_kwargs or {})}

    def tool_plan(self, auto_parser: Optional[str]) -> ToolPlan:
        choice = self.tool_choice or {}
        kind = choice.get("type", "auto" if self.tools else "none")
        if kind == "tool":
            chat_choice: Any = {"type": "function", "function": {"name": choice.get("name")}}
        elif kind in ("auto", "none"):
            chat_choice = kind
        elif kind == "any":
            chat_choice = "required"
        else:
            raise APIError(400, f"tool_choice.type must be auto, any, tool or none, got {kind!r}.",
                           param="tool_choice")
        return plan_tools(chat_tools(self.tools), chat_choice, auto_parser)

    def to_sampling_params(self, plan: ToolPlan, defaults: Optional[dict] = None) -> SamplingParams:
        constraint = self._format_constraint()
        if constraint is not None and plan.constraint is not None:
            raise APIError(400, "output_config.format cannot be combined with a forced tool_choice (any, "
                                "tool), which constrains the output itself.", param="output_config")
        try:
            return SamplingParams(
                **sampling_fields(defaults, self.temperature, self.top_p, self.top_k),
                max_tokens=self.max_tokens, stop=self.stop_sequences, seed=self.seed,
                structured_outputs=constraint or plan.constraint, output_kind=output_kind_for(bool(self.stream)))
        except ValueError as exc:
            err = bad_request_from_value_error(exc)
            if err.param == "stop":   # the wire name of the field
                err = APIError(400, err.message, param="stop_sequences")
            raise err from None

    def _format_constraint(self) -> Optional[StructuredOutputsParams]:
        fmt = (self.output_config or {}).get("format")
        if fmt is None:
            return None
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise APIError(400, "output_config.format must be {\"type\": \"json_schema\", \"schema\": {...}}.",
                           param="output_config")
        try:
            return StructuredOutputsParams(json=fmt["schema"])
        except ValueError as exc:
            raise APIError(400, f"output_config.format: {exc}", param="output_config") from None

    def conversation(self) -> list[dict]:
        """The system prompt and the messages as chat messages for the template. System
        messages inside `messages` join the system prompt, as vLLM joins them."""
        if not self.messages:
            raise APIError(400, "messages: at least one message is required.", param="messages")
        system = [_text_of(self.system, "system")] if self.system else []
        out = []
        for index, message in enumerate(self.messages):
            if isinstance(message, dict) and message.get("role") == "system":
                system.append(_text_of(message.get("content") or "", f"messages[{index}].content"))
            else:
                out += _chat_messages(index, message)
        if not out:
            raise APIError(400, "messages: at least one user or assistant message is required.", param="messages")
        return ([{"role": "system", "content": "".join(system)}] if system else []) + out


def chat_tools(tools: Optional[list[Any]]) -> Optional[list[dict]]:
    """Anthropic's client tools ({"name", "description", "input_schema"}) in the chat shape."""
    if tools is None:
        return None
    converted = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise APIError(400, f"tools[{index}]: only client tools (name, description, input_schema) are "
                                f"supported by this server, got type {kind!r}.", param="tools")
        converted.append({"type": "function", "function": {
            "name": tool.get("name"), "description": tool.get("description"),
            "parameters": tool.get("input_schema")}})
    return converted


def _chat_messages(index: int, message: Any) -> list[dict]:
    where = f"messages[{index}]"
    role = message.get("role") if isinstance(message, dict) else None
    if role not in _ROLES:
        raise APIError(400, f"{where}.role must be user or assistant, got {role!r}.", param="messages")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content blocks.", param="messages")
    text, calls, results = [], [], []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            text.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": block.get("input") or {}}})
        elif kind == "tool_result" and role == "user":
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": _text_of(block.get("content") or "", f"{where}.content")})
        elif kind in _SKIPPED_BLOCKS and role == "assistant":
            continue
        else:
            raise APIError(400, f"{where}: content blocks of type {kind!r} are not supported here (this server "
                                "takes text, tool_use and tool_result).", param="messages")
    if role == "assistant":
        message = {"role": "assistant", "content": "".join(text)}
        if calls:
            message["tool_calls"] = calls
        return [message]
    # A user turn: its tool results first (they answer the calls just before), then its text.
    return results + ([{"role": "user", "content": "".join(text)}] if text or not results else [])


def _text_of(value: Any, where: str) -> str:
    """A string, or the text of a list of text blocks."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in value):
        return "".join(str(b.get("text", "")) for b in value)
    param = where.split(".")[0].split("[")[0]   # the top-level field: system, messages
    raise APIError(400, f"{where} must be a string or a list of text blocks.", param=param)


def tool_input(arguments: str) -> Any:
    """A call's arguments (JSON text) as tool_use's input object."""
    try:
        return json.loads(arguments)
    except ValueError:
        return {}
