"""The bodies of vLLM's pooling routes, /v1/embeddings (EmbeddingRequest) and /pooling
(PoolingRequest), as pydantic models.

Both take their prompts one of two ways, as vLLM: `input` (a text, token ids, or a batch of
either) or chat `messages` (one conversation, or a batch of them), each conversation rendered
with the chat template into one prompt. vLLM also accepts a conversation sent as `input`;
pooling_runs.read_pooling_request moves it to `messages` before validation. How the vectors
come back (encoding_format, embed_dtype, endianness) is embedding_encodings.py's.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict

from aserve.pooling_params import PoolingParams
from aserve.server.embedding_encodings import EmbedDType, EncodingFormat, Endianness
from aserve.server.errors import APIError
from aserve.server.protocol import ChatMessage, conversation_of

# vLLM's PoolingTask values; this engine pools the last token's hidden state, so "embed" only.
POOLING_TASKS = ("embed", "classify", "token_embed", "token_classify", "plugin", "embed&token_classify")
SUPPORTED_TASKS = ("embed",)
# Tasks vLLM dropped, with the words it refuses them with.
_REMOVED_TASKS = {"score": "`score` task was removed; use `classify` instead.",
                  "encode": "`encode` task was removed; use `token_embed` or `token_classify` instead."}
_NO_PLUGIN = ("No IOProcessor plugin installed. Please refer to the documentation and to the "
              "'prithvi_geospatial_mae_io_processor' offline inference example for more details.")


class PoolingInputRequest(BaseModel):
    """What both pooling routes share: the prompts, the chat extras, truncation, encoding."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    user: Optional[str] = None
    input: Optional[Union[str, list[str], list[int], list[list[int]]]] = None
    messages: Optional[Union[list[ChatMessage], list[list[ChatMessage]]]] = None
    # vLLM's chat extras (used with `messages` only); vLLM's defaults for pooling: no generation prompt.
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    # None: true for `input` (BOS as the tokenizer adds it), false for `messages` (the template writes it).
    add_special_tokens: Optional[bool] = None
    truncate_prompt_tokens: Optional[int] = None
    truncation_side: Optional[Literal["left", "right"]] = None   # as on /v1/completions
    dimensions: Optional[int] = None        # /v1/embeddings' (Matryoshka); /pooling refuses it, as vLLM
    encoding_format: EncodingFormat = "float"
    embed_dtype: EmbedDType = "float32"
    endianness: Endianness = "native"
    use_activation: Optional[bool] = None   # None: normalise, as the model's pooler does
    normalize: Optional[bool] = None        # vLLM's older name for use_activation (wins if both)

    def check_prompts(self) -> None:
        if (self.input is None) == (self.messages is None):
            raise APIError(400, "Give exactly one of input or messages.", param="input")
        if self.continue_final_message and self.add_generation_prompt:
            raise APIError(400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                           param="continue_final_message")
        if isinstance(self.input, list) and not self.input:
            raise APIError(400, "input must not be empty.", param="input")
        if self.messages is not None and not all(self.conversations()):
            raise APIError(400, "messages must hold at least one message (each conversation of a batch too).",
                           param="messages")

    def prompts(self) -> list:
        """`input` as a list of prompts (texts or token-id lists)."""
        value = self.input
        return [value] if isinstance(value, str) or isinstance(value[0], int) else list(value)

    def conversations(self) -> list[list[dict[str, Any]]]:
        """`messages` as a list of conversations, each as the chat template takes it."""
        batch = self.messages if self.messages and isinstance(self.messages[0], list) else [self.messages]
        return [conversation_of(one) for one in batch]

    def special_tokens(self) -> bool:
        return self.add_special_tokens if self.add_special_tokens is not None else self.input is not None

    def pooling_params(self) -> PoolingParams:
        try:
            normalize = self.normalize if self.normalize is not None else self.use_activation
            return PoolingParams(dimensions=self.dimensions, normalize=normalize)
        except ValueError as exc:
            raise APIError(400, str(exc), param="dimensions") from None


class EmbeddingRequest(PoolingInputRequest):
    """POST /v1/embeddings: OpenAI's fields and vLLM's (EmbeddingCompletionRequest and
    EmbeddingChatRequest in one)."""


class PoolingRequest(PoolingInputRequest):
    """POST /pooling: vLLM's PoolingCompletionRequest / PoolingChatRequest; `data` alone is
    its IOProcessorRequest, for plugins this server does not have."""

    task: Optional[str] = None
    data: Optional[Any] = None

    def check_task(self) -> str:
        """The task this request pools for (the model's, "embed", when not given); 400s as vLLM's."""
        if self.dimensions is not None:
            raise APIError(400, "dimensions is currently not supported", param="dimensions")
        task = "plugin" if self.data is not None and self.input is None and self.messages is None else self.task
        if task in _REMOVED_TASKS:
            raise APIError(400, _REMOVED_TASKS[task], param="task")
        if task is not None and task not in POOLING_TASKS:
            allowed = ", ".join(repr(t) for t in POOLING_TASKS)
            raise APIError(400, f"Invalid value for 'task': Input should be one of {allowed} (got {task!r}).",
                           param="task")
        if task == "plugin":
            raise APIError(400, _NO_PLUGIN, param="task")
        if task is not None and task not in SUPPORTED_TASKS:
            raise APIError(400, f"Unsupported task: {task!r} Supported tasks: {SUPPORTED_TASKS}", param="task")
        return task or SUPPORTED_TASKS[0]
