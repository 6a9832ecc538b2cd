"""The bodies of /v1/completions' and /v1/chat/completions' answers, streamed and not, in OpenAI's
shapes with vLLM's extras (the requests are in protocol.py)."""

from __future__ import annotations

import time
from typing import Optional, Union

from pydantic import BaseModel, Field


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's shape of one prompt logprob entry (its Logprob)."""
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# vLLM's prompt_logprobs: per prompt position, None for the first, else token id -> entry.
PromptLogprobsOut = list[Optional[dict[str, PromptLogprob]]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None  # vLLM's extra: the stop string or token
    token_ids: Optional[list[int]] = None   # vLLM's, with return_token_ids (null without, as vLLM)
    prompt_logprobs: Optional[PromptLogprobsOut] = None  # vLLM's extra, on the choice
    prompt_token_ids: Optional[list[int]] = None


class CompletionStreamChoice(BaseModel):
    """A streamed completion chunk's choice: what a non-streamed choice has, less the fields
    a stream never fills (vLLM's stream choices omit them)."""
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0   # prompt tokens served from the prefix cache


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0   # the thinking's share of the completion (with a reasoning parser)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None
    completion_tokens_details: Optional[CompletionTokensDetails] = None   # chat with a reasoning parser


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    # OpenAI's fields that aserve has no value for: null, as vLLM writes them (clients compare
    # the keys of a raw answer with their parsed models').
    service_tier: Optional[str] = None
    system_fingerprint: Optional[str] = None
    usage: Optional[UsageInfo] = None


class CompletionStreamResponse(BaseModel):
    """A streamed completion chunk (server/stream_chunks.py writes the plain one directly)."""
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionStreamChoice]
    usage: Optional[UsageInfo] = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: Optional[str] = None
    # OpenAI's message fields aserve never fills: null, as vLLM writes them.
    refusal: Optional[str] = None
    annotations: Optional[list[dict]] = None
    audio: Optional[dict] = None
    function_call: Optional[dict] = None
    tool_calls: list[dict] = Field(default_factory=list)   # vLLM's default: an empty list
    reasoning: Optional[str] = None   # vLLM's, with --reasoning-parser: the model's thinking


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    token_ids: Optional[list[int]] = None   # vLLM's, with return_token_ids (null without, as vLLM)


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    service_tier: Optional[str] = None        # OpenAI's, null as vLLM writes it
    system_fingerprint: Optional[str] = None
    usage: Optional[UsageInfo] = None
    prompt_logprobs: Optional[PromptLogprobsOut] = None  # vLLM's extra, on the response
    prompt_token_ids: Optional[list[int]] = None   # vLLM's, with return_token_ids


class DeltaMessage(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    reasoning: Optional[str] = None
    tool_calls: Optional[list[dict]] = None   # OpenAI's tool-call fragments (tool_parsers.Delta)


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = None
