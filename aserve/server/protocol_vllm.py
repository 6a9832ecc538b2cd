"""vLLM's extra request fields on the OpenAI routes (its protocol's "extra params"), kept apart
from OpenAI's own fields in protocol.py.

Every field vLLM documents for /v1/completions and /v1/chat/completions is either honoured
here, or declared so that a request setting it gets a 400 naming it: a client must never
believe a field took effect when it did not. Names vLLM does not know stay ignored, as vLLM
and OpenAI ignore them. (Structured output and tool fields are owned by structured_request.py.)
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict

from aserve.server.errors import APIError
from aserve.server.random_ids import random_hex_id

# vLLM's fields that aserve does not implement, with the value that means "not used": each is
# refused when set to anything else. Why: prompt_embeds needs an embedding input path;
# logits_processors runs user-named code; priority needs priority scheduling; cache_salt a
# salted prefix cache; kv_transfer_params disaggregated serving; vllm_xargs custom extensions;
# mm_processor_kwargs a multimodal processor; thinking_token_budget a cap on reasoning tokens
# (-1, unlimited, is taken as unset).
UNIMPLEMENTED_FIELDS: dict[str, Any] = {
    "prompt_embeds": None, "logits_processors": None, "priority": 0, "cache_salt": None,
    "kv_transfer_params": None, "vllm_xargs": None, "mm_processor_kwargs": None, "thinking_token_budget": None,
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class VllmSamplingFields(_Strict):
    """vLLM's sampling extras shared by both OpenAI routes."""

    prompt_logprobs: Optional[int] = None
    prompt_logprobs_temperature: Optional[float] = None   # the prompt's logprobs at this temperature
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    # Keep only the prompt's last k tokens (-1: the model's context length, as newer vLLM).
    truncate_prompt_tokens: Optional[int] = None
    # Which end truncate_prompt_tokens keeps: "right" cuts the end (the first tokens stay),
    # "left" (and None, vLLM's default) the start.
    truncation_side: Optional[Literal["left", "right"]] = None
    # Logprobs name each token 'token_id:N' (None: the server's --return-tokens-as-token-ids).
    return_tokens_as_token_ids: Optional[bool] = None
    # The client's id for the request: the response's id is 'cmpl-<id>' / 'chatcmpl-<id>', as
    # vLLM names it; one still running with the same id makes this one a 400.
    request_id: Optional[str] = None
    # The token ids with the text: the prompt's and each choice's (streams: the prompt's in the
    # first chunk, then each chunk's new ids), as vLLM's field.
    return_token_ids: Optional[bool] = None
    # Declared only to be refused when set (UNIMPLEMENTED_FIELDS).
    prompt_embeds: Optional[Any] = None
    logits_processors: Optional[Any] = None
    priority: Optional[Any] = 0
    cache_salt: Optional[Any] = None
    kv_transfer_params: Optional[Any] = None
    vllm_xargs: Optional[Any] = None
    mm_processor_kwargs: Optional[Any] = None
    thinking_token_budget: Optional[Any] = None

    def check_vllm_fields(self, stream: bool) -> None:
        """A 400 for a vLLM field this server cannot honour, or one used as vLLM forbids."""
        for name, unused in UNIMPLEMENTED_FIELDS.items():
            value = getattr(self, name)
            if name == "thinking_token_budget" and value == -1 and not isinstance(value, bool):
                continue   # vLLM's "unlimited": no budget
            if value != unused and not (isinstance(value, (list, dict)) and not value):  # [] / {}: none
                raise APIError(400, f"{name} is not supported by this server.", param=name)
        if self.prompt_logprobs is not None:
            # -1 is the whole vocabulary per position: allowed where --max-logprobs allows it (-1),
            # as vLLM; the engine refuses it with that bound otherwise.
            if self.prompt_logprobs < -1:
                raise APIError(400, f"prompt_logprobs must be -1 (the whole vocabulary) or at least 0, got "
                                    f"{self.prompt_logprobs}.", param="prompt_logprobs")
            if stream and self.prompt_logprobs > 0:
                raise APIError(400, "prompt_logprobs are not available when stream is true.",
                               param="prompt_logprobs")
        if self.truncate_prompt_tokens is not None and not (
                self.truncate_prompt_tokens == -1 or self.truncate_prompt_tokens >= 1):
            raise APIError(400, f"truncate_prompt_tokens must be -1 or at least 1, got "
                                f"{self.truncate_prompt_tokens}.", param="truncate_prompt_tokens")

    def requested_prompt_logprobs(self) -> Optional[int]:
        # vLLM takes 0 with stream=true, and a stream carries none: then none are computed.
        if getattr(self, "stream", False) and self.prompt_logprobs == 0:
            return None
        return self.prompt_logprobs

    def vllm_sampling_kwargs(self) -> dict[str, Any]:
        """The SamplingParams fields these carry (those the request set)."""
        return {"allowed_token_ids": self.allowed_token_ids, "bad_words": self.bad_words,
                "truncate_prompt_tokens": self.truncate_prompt_tokens,
                "prompt_logprobs_temperature": self.prompt_logprobs_temperature}

    def response_id(self, prefix: str) -> str:
        return f"{prefix}-{self.request_id or random_hex_id()}"

    def tokens_as_ids(self, server_default: bool) -> bool:
        return server_default if self.return_tokens_as_token_ids is None else self.return_tokens_as_token_ids


class VllmCompletionFields(_Strict):
    add_special_tokens: bool = True   # BOS (or the tokenizer's own specials) before a text prompt


class VllmChatFields(_Strict):
    """vLLM's chat extras: how the messages become the prompt, and what comes back."""

    echo: bool = False                    # the reply starts with the last message, same role
    continue_final_message: bool = False  # the last message stays open; the model continues it
    add_special_tokens: bool = False      # BOS on top of what the template writes
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    documents: Optional[list[dict[str, str]]] = None  # for RAG templates
    include_reasoning: bool = True        # with --reasoning-parser: the message's `reasoning`
    separate_reasoning: bool = True       # false: the thinking goes into `content`, before the answer

    def check_chat_fields(self, add_generation_prompt: bool) -> None:
        if self.continue_final_message and add_generation_prompt:
            raise APIError(400, "Cannot set both continue_final_message and add_generation_prompt "
                                "to true.", param="continue_final_message")
