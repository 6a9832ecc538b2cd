"""What a chat request's answer looks like beyond the generated text (vLLM's chat extras): the
role it speaks in, what it echoes, how its logprobs are named, and how its prompt is rendered.

vLLM's rules: with add_generation_prompt the reply is the assistant's; without it the model
continues in the last message's role. With echo, the reply starts with the last message's
content when that message has the reply's role (a prefilled answer comes back whole).
"""

from __future__ import annotations

from dataclasses import dataclass

from aserve.server.prompts import ChatTemplateOptions
from aserve.server.protocol import ChatCompletionRequest

ASSISTANT = "assistant"


@dataclass(frozen=True)
class ChatReply:
    role: str
    echoed: str    # text the reply starts with ("" without echo)
    top_n: int     # top logprobs per token; -1: all the engine returned
    as_ids: bool   # logprobs name tokens 'token_id:N'


def chat_reply(req: ChatCompletionRequest, server_tokens_as_ids: bool, response_role: str = ASSISTANT) -> ChatReply:
    """response_role: the server's --response-role (the reply's role after a generation prompt)."""
    last = req.messages[-1]
    role = response_role if req.add_generation_prompt else last.role
    echoed = last.text() if req.echo and last.role == role else ""
    return ChatReply(role=role, echoed=echoed, top_n=req.top_logprobs or 0,
                     as_ids=req.tokens_as_ids(server_tokens_as_ids))


def template_options(req: ChatCompletionRequest) -> ChatTemplateOptions:
    kwargs = req.chat_template_kwargs
    if req.reasoning_effort is not None:   # the request's own kwargs say it louder
        # "none" also turns thinking off where a template reads enable_thinking (Qwen3's), as vLLM.
        off = {"enable_thinking": False} if req.reasoning_effort == "none" else {}
        kwargs = {"reasoning_effort": req.reasoning_effort, **off, **(kwargs or {})}
    return ChatTemplateOptions(
        continue_final_message=req.continue_final_message, add_special_tokens=req.add_special_tokens,
        chat_template=req.chat_template, chat_template_kwargs=kwargs,
        documents=req.documents, truncate_prompt_tokens=req.truncate_prompt_tokens,
        truncation_side=req.truncation_side)
