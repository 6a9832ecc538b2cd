"""The bodies of the model list and of vLLM's /tokenize and /detokenize (app.py's small routes),
as pydantic models; the chat and completion bodies are in protocol.py."""

from __future__ import annotations

import time
from typing import Any, Optional

from pydantic import BaseModel, Field

from aserve.server.protocol import ChatMessage, _Strict
from aserve.server.random_ids import random_hex_id


class ModelPermission(BaseModel):
    """What vLLM lists under a model card's `permission` (OpenAI's old model-permission
    object): sampling and logprobs allowed, no fine-tuning; some clients read it."""
    id: str = Field(default_factory=lambda: f"modelperm-{random_hex_id()}")
    object: str = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: Optional[str] = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "aserve"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class TokenizeRequest(_Strict):
    """vLLM's two tokenize requests in one: a prompt, or messages rendered as chat does."""
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    # None: vLLM's default, true for a prompt, false for messages (their template writes BOS).
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[Any] = None   # with messages: the tools the template writes, as chat's
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(_Strict):
    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
