"""A response of /v1/responses in OpenAI's shape: its output items (an assistant message, the
function calls) from the engine's output, its usage, and the response object around them.

A response cut off by max_output_tokens is "incomplete" with incomplete_details.reason
"max_output_tokens", as OpenAI reports it (its message item too); anything else that finished
is "completed".
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional

from aserve.outputs import CompletionOutput, RequestOutput
from aserve.server.openai_logprobs import chat_logprobs
from aserve.server.protocol_responses import ResponsesRequest, new_item_id
from aserve.server.reasoning import ReasoningView
from aserve.server.tool_calls import ToolPlan, calls_from_output

if TYPE_CHECKING:
    from aserve.server.app import ServerState


def status_of(finish_reason: Optional[str]) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def text_part(text: str, logprobs: Optional[list] = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def message_item(item_id: str, status: str, parts: list[dict]) -> dict:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": parts}


def function_call_item(name: str, arguments: str, status: str = "completed") -> dict:
    return {"id": new_item_id("fc"), "type": "function_call", "call_id": new_item_id("call"), "name": name,
            "arguments": arguments, "status": status}


async def response_logprobs(state: "ServerState", req: ResponsesRequest, token_ids, logprobs) -> list[dict]:
    """OpenAI's logprobs of output_text: token, logprob, bytes and top_logprobs per token (named
    'token_id:N' under the server's --return-tokens-as-token-ids)."""
    if not req.wants_logprobs:
        return []
    entries = await chat_logprobs(state, token_ids, logprobs, req.top_logprobs or 0,
                                  state.return_tokens_as_token_ids)
    return [entry.model_dump() for entry in entries]


def reasoning_part(text: str) -> dict:
    return {"type": "reasoning_text", "text": text}


def reasoning_item(item_id: str, status: str, parts: list[dict]) -> dict:
    return {"id": item_id, "type": "reasoning", "summary": [], "content": parts, "status": status}


async def output_items(state: "ServerState", req: ResponsesRequest, plan: ToolPlan, output: CompletionOutput,
                       view: ReasoningView) -> list[dict]:
    """The output items of a finished output: the thinking (with --reasoning-parser), the
    assistant's message (unless the output was only thinking or calls), then one function_call
    item per call."""
    reasoning, text = view.final(output.text)
    content, calls = calls_from_output(plan, text)
    status = status_of(output.finish_reason)
    items = []
    if reasoning:
        items.append(reasoning_item(new_item_id("rs"), "completed" if content or calls else status,
                                    [reasoning_part(reasoning)]))
    if content or not (calls or reasoning):
        # Logprobs belong to the whole text: given where that text is the message.
        lps = (await response_logprobs(state, req, output.token_ids, output.logprobs)
               if plan.mode == "none" and not view.active else [])
        items.append(message_item(new_item_id("msg"), status, [text_part(content or "", lps)]))
    items += [function_call_item(call.name, call.arguments) for call in calls]
    return items


def pick_first(*values):
    return next(v for v in values if v is not None)


def usage_of(final: Optional[RequestOutput], view: Optional[ReasoningView] = None) -> Optional[dict]:
    if final is None:
        return None
    prompt = len(final.prompt_token_ids)
    completion = sum(len(o.token_ids) for o in final.outputs)
    reasoning = sum(view.reasoning_tokens(o.token_ids, o.text) for o in final.outputs) if view else 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": final.num_cached_tokens or 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion}


def response_object(req: ResponsesRequest, response_id: str, model: str, created_at: int, status: str,
                    output: list[dict], usage: Optional[dict] = None, error: Optional[dict] = None,
                    store: bool = False, temperature: Optional[float] = None,
                    top_p: Optional[float] = None) -> dict[str, Any]:
    """The response object: what was asked (echoed as OpenAI echoes it, with the sampling
    values in effect), the output and usage, the status."""
    text = dict(req.text or {})
    text.setdefault("format", {"type": "text"})
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status,
        "background": bool(req.background), "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": None, "metadata": req.metadata or {}, "model": model, "output": output,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id, "reasoning": req.reasoning,
        "service_tier": req.service_tier or "auto", "store": store,
        "temperature": pick_first(temperature, req.temperature, 1.0), "text": text,
        "tool_choice": req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none"),
        "tools": req.tools or [], "top_logprobs": req.top_logprobs or 0,
        "top_p": pick_first(top_p, req.top_p, 1.0), "truncation": req.truncation or "disabled",
        "usage": usage, "user": req.user,
        "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
    }


class ResponseTurn:
    """One request's identity and what it asked: enough to build its response object."""

    def __init__(self, state: "ServerState", req: ResponsesRequest, plan: ToolPlan, stored: bool,
                 params=None) -> None:
        self.state, self.req, self.plan, self.stored = state, req, plan, stored
        self.params = params   # the SamplingParams in effect: the echoed temperature and top_p
        self.view = ReasoningView(None, [])   # its thinking (set once the prompt is known)
        self.response_id = req.response_id()
        self.created_at = int(time.time())

    def body(self, status: str, output: list[dict], usage: Optional[dict] = None,
             error: Optional[dict] = None) -> dict:
        params = self.params
        return response_object(self.req, self.response_id, self.state.served_model_name, self.created_at,
                               status, output, usage, error, store=self.stored,
                               temperature=params.temperature if params is not None else None,
                               top_p=params.top_p if params is not None else None)
