"""The body of POST /v1/responses (OpenAI's Responses API, with vLLM's extras) and what it
asks of the engine: the conversation to render, the sampling params, the tools.

Input items become chat messages: a message (its text parts; "developer" speaks as "system",
as chat templates know no developer role), a function_call (an assistant's tool call), a
function_call_output (a "tool" message answering it). Reasoning items are skipped, as vLLM
skips them. Anything that needs what a text model or this server lacks (images, files,
hosted tools, item references, stored prompts) is a 400 naming the field, never ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict

from aserve.models.generation_config import sampling_fields
from aserve.sampling_params import SamplingParams
from aserve.server.errors import APIError, bad_request_from_value_error
from aserve.server.protocol import output_kind_for
from aserve.server.protocol_vllm import UNIMPLEMENTED_FIELDS
from aserve.server.random_ids import random_hex_id
from aserve.server.structured_request import structured_outputs_from
from aserve.server.tool_calls import ToolPlan, plan_tools

LOGPROBS_INCLUDE = "message.output_text.logprobs"
# OpenAI's include values; only the logprobs one concerns what this server produces (the
# others name items of hosted tools and images, which never occur here).
_KNOWN_INCLUDES = frozenset({
    LOGPROBS_INCLUDE, "code_interpreter_call.outputs", "computer_call_output.output.image_url",
    "file_search_call.results", "message.input_image.image_url", "reasoning.encrypted_content",
    "web_search_call.action.sources", "web_search_call.results"})
# OpenAI's fields this server cannot honour: a request that sets them gets a 400 naming them.
_UNSUPPORTED = {
    "max_tool_calls": "this server runs no hosted tools, and function calls are not counted",
    "prompt": "stored prompt templates live on OpenAI's platform",
    "conversation": "the Conversations API is not served; chain responses with previous_response_id",
}
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{random_hex_id()}"


class ResponsesRequest(BaseModel):
    # Strict: a string where a number belongs is a 400; unknown fields are ignored (newer clients).
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    input: Union[str, list[Any]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_logprobs: Optional[int] = None
    include: Optional[list[str]] = None
    stream: Optional[bool] = False
    stream_options: Optional[dict[str, Any]] = None   # include_obfuscation: nothing to obfuscate
    store: Optional[bool] = True
    background: Optional[bool] = False
    previous_response_id: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    parallel_tool_calls: Optional[bool] = True   # accepted and, as vLLM, not enforced
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    text: Optional[dict[str, Any]] = None        # format (text, json_object, json_schema), verbosity
    reasoning: Optional[dict[str, Any]] = None   # echoed: these models do not reason apart
    truncation: Optional[Literal["auto", "disabled"]] = "disabled"
    user: Optional[str] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None
    max_tool_calls: Optional[Any] = None
    prompt: Optional[Any] = None
    conversation: Optional[Any] = None
    # vLLM's extras on this route.
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    ignore_eos: bool = False
    logit_bias: Optional[dict[str, float]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: Optional[Any] = None
    request_id: Optional[str] = None   # the response's id is resp_<request_id>
    priority: Optional[Any] = 0
    cache_salt: Optional[Any] = None
    kv_transfer_params: Optional[Any] = None
    vllm_xargs: Optional[Any] = None
    mm_processor_kwargs: Optional[Any] = None

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """400s for what the model's validation cannot see: unsupported fields and mixes."""
        for name, why in _UNSUPPORTED.items():
            if getattr(self, name) is not None:
                raise APIError(400, f"{name} is not supported by this server: {why}.", param=name)
        for name, unused in UNIMPLEMENTED_FIELDS.items():
            value = getattr(self, name, unused)
            if value != unused and not (isinstance(value, (list, dict)) and not value):
                raise APIError(400, f"{name} is not supported by this server.", param=name)
        for value in self.include or []:
            if value not in _KNOWN_INCLUDES:
                raise APIError(400, f"include: unknown value {value!r}; this server returns "
                                    f"{LOGPROBS_INCLUDE!r}.", param="include")
        if self.top_logprobs is not None and self.top_logprobs < 0:
            raise APIError(400, f"top_logprobs must be at least 0, got {self.top_logprobs}.",
                           param="top_logprobs")
        # store null is the default (true), as in vLLM; vLLM's words, which its tests match.
        if self.background and self.store is False:
            raise APIError(400, "background can only be used when `store` is true.", param="background")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options can only be set when stream is true.", param="stream_options")

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or [])

    def response_id(self) -> str:
        return f"resp_{self.request_id or random_hex_id()}"

    # ------------------------------------------------------------------ tools and sampling
    def tool_plan(self, auto_parser: Optional[str]) -> ToolPlan:
        """The function tools and tool_choice, in the chat route's terms."""
        return plan_tools(_chat_tools(self.tools), _chat_tool_choice(self.tool_choice), auto_parser)

    def constraint_param(self) -> str:
        """The field that carries the output's constraint (for a grammar's 400)."""
        if self.structured_outputs is not None:
            return "structured_outputs"
        fmt = (self.text or {}).get("format")
        return "text" if isinstance(fmt, dict) and fmt.get("type") != "text" else "tool_choice"

    def to_sampling_params(self, plan: ToolPlan, defaults: Optional[dict] = None) -> SamplingParams:
        constraint = _text_format_constraint(self.text, self.structured_outputs)
        if constraint is not None and plan.constraint is not None:
            raise APIError(400, "text.format cannot be combined with a named or \"required\" tool_choice, "
                                "which constrains the output itself.", param="text")
        try:
            return SamplingParams(
                **sampling_fields(defaults, self.temperature, self.top_p, self.top_k,
                                  repetition_penalty=self.repetition_penalty),
                seed=self.seed, stop=self.stop, ignore_eos=self.ignore_eos, logit_bias=self.logit_bias,
                max_tokens=self.max_output_tokens,
                logprobs=(self.top_logprobs or 0) if self.wants_logprobs else None,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                structured_outputs=constraint if constraint is not None else plan.constraint,
                output_kind=output_kind_for(bool(self.stream)))
        except ValueError as exc:
            err = bad_request_from_value_error(exc)
            if err.param == "max_tokens":   # the wire name of the field
                err = APIError(400, err.message.replace("max_tokens", "max_output_tokens", 1),
                               param="max_output_tokens")
            raise err from None


def _chat_tools(tools: Optional[list[Any]]) -> Optional[list[dict]]:
    """Responses' flat function tools ({"type", "name", "description", "parameters"}) in the
    chat shape plan_tools reads; hosted tools (web search, file search, MCP...) are refused."""
    if tools is None:
        return None
    chat_tools = []
    for index, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise APIError(400, f"tools[{index}]: only function tools are supported by this server, got "
                                f"type {kind!r}.", param="tools")
        chat_tools.append({"type": "function", "function": {
            k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}})
    return chat_tools


def _chat_tool_choice(choice: Any) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        return {"type": "function", "function": {"name": choice.get("name")}}
    if isinstance(choice, dict) and choice.get("type") not in ("function", None):
        raise APIError(400, f"tool_choice of type {choice.get('type')!r} is not supported by this server; "
                            "use none, auto, required or {\"type\": \"function\", \"name\": ...}.",
                       param="tool_choice")
    return choice


def _text_format_constraint(text: Optional[dict], structured_outputs: Any):
    """text.format as a constraint (json_object, json_schema), or vLLM's structured_outputs."""
    fmt = (text or {}).get("format")
    response_format = None
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise APIError(400, "text.format must be an object with a type.", param="text")
        if fmt.get("type") == "json_schema":
            response_format = {"type": "json_schema", "json_schema": {
                k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
        else:
            response_format = fmt
    try:
        return structured_outputs_from(response_format=response_format, structured_outputs=structured_outputs)
    except APIError as err:
        if err.param != "response_format":
            raise
        raise APIError(400, err.message.replace("response_format", "text.format"), param="text") from None


# ----------------------------------------------------------------------------- input items
def input_items(value: Union[str, list[Any]]) -> list[dict]:
    """The request's input as OpenAI's input items, each with an id (what GET
    /v1/responses/{id}/input_items lists)."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not value:
        raise APIError(400, "input must not be empty.", param="input")
    items = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise APIError(400, f"input[{index}] must be an object (a message or an item).", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise APIError(400, f"input[{index}].role must be user, assistant, system or developer, "
                                    f"got {role!r}.", param="input")
            items.append({"id": item.get("id") or new_item_id("msg"), "type": "message", "role": role,
                          "status": "completed", "content": _parts(index, role, item.get("content"))})
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise APIError(400, f"input[{index}].{key} must be a string.", param="input")
            items.append({"id": item.get("id") or new_item_id("fc"), "type": "function_call",
                          "call_id": item["call_id"], "name": item["name"], "arguments": item["arguments"],
                          "status": "completed"})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str) or not isinstance(output, (str, list)):
                raise APIError(400, f"input[{index}] (function_call_output) needs call_id and output.",
                               param="input")
            if isinstance(output, list):
                output = "".join(_part_text(index, part) for part in output)
            items.append({"id": item.get("id") or new_item_id("fco"), "type": "function_call_output",
                          "call_id": item["call_id"], "output": output, "status": "completed"})
        elif kind == "reasoning":
            continue   # these models write no separate reasoning; vLLM skips it too
        else:
            raise APIError(400, f"input[{index}]: items of type {kind!r} are not supported by this server.",
                           param="input")
    return items


def _parts(index: int, role: str, content: Any) -> list[dict]:
    part_type = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        return [{"type": part_type, "text": content}]
    if not isinstance(content, list):
        raise APIError(400, f"input[{index}].content must be a string or a list of parts.", param="input")
    return [{"type": part_type, "text": _part_text(index, part)} for part in content]


def _part_text(index: int, part: Any) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in _TEXT_PARTS:
        raise APIError(400, f"input[{index}]: content parts of type {kind!r} are not supported; this "
                            "server takes text only.", param="input")
    text = part.get("refusal" if kind == "refusal" else "text")
    if not isinstance(text, str):
        raise APIError(400, f"input[{index}]: a {kind} part needs its text.", param="input")
    return text


def items_as_messages(items: list[dict]) -> list[dict]:
    """Input or output items as chat messages for the template: a function call joins the
    assistant message just before it (a response's text and its calls are one turn)."""
    messages: list[dict] = []
    for item in items:
        kind = item["type"]
        if kind == "message":
            messages.append({"role": _ROLES[item["role"]],
                             "content": "".join(part["text"] for part in item["content"])})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": _arguments(item["arguments"])}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def _arguments(text: str) -> Any:
    # Templates write a call's arguments with tojson: an object, as the chat route gives them.
    try:
        return json.loads(text)
    except ValueError:
        return text
