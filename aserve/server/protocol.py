"""Request bodies of the OpenAI-compatible routes, as pydantic models, with OpenAI's field names
(the answers' bodies are in protocol_answers.py; the simple /generate API's in
protocol_generate.py).

Requests validate in strict mode: a string where a number belongs is a 400, never a silent
coercion. Sampling values are range-checked by SamplingParams (one owner of those rules); this
module only maps the wire names onto it. Every error leaves as OpenAI's error body.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, model_validator

from aserve.models.generation_config import sampling_fields
from aserve.sampling_params import RequestOutputKind, SamplingParams
from aserve.server.content_format import PARTS_KEY
from aserve.server.errors import EMPTY_PROMPT, APIError, bad_request_from_value_error
from aserve.server.structured_request import request_constraint
from aserve.server.tool_calls import template_messages
from aserve.server.protocol_vllm import VllmChatFields, VllmCompletionFields, VllmSamplingFields


# ----------------------------------------------------------------------------- sampling fields
class _Strict(BaseModel):
    # Unknown fields are ignored, as OpenAI and vLLM do, so newer clients keep working.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    # Usage only when include_usage is true, as OpenAI and newer vLLM (older vLLM took an unset
    # include_usage in a given stream_options as true; its current tests say {} means none).
    include_usage: Optional[bool] = None
    # vLLM's: usage on every chunk too, with include_usage.
    continuous_usage_stats: bool = False

    @property
    def continuous_usage(self) -> bool:
        return self.continuous_usage_stats and self.include_usage is True

    @property
    def final_usage(self) -> bool:
        return self.include_usage is True


class _SamplingRequest(_Strict, VllmSamplingFields):
    """The sampling fields shared by /v1/completions and /v1/chat/completions (vLLM's extras too)."""

    model: Optional[str] = None
    n: int = 1
    best_of: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    top_k: Optional[int] = None
    # Unset sampling fields take the model's defaults (its generation config), as in vLLM.
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: Union[bool, Literal["never"]] = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Structured outputs: OpenAI's and vLLM's fields, read (and refused when wrong or
    # unsupported, by name) in structured_request.py.
    response_format: Optional[Any] = None
    structured_outputs: Optional[Any] = None
    guided_json: Optional[Any] = None
    guided_regex: Optional[Any] = None
    guided_choice: Optional[Any] = None
    guided_grammar: Optional[Any] = None
    guided_whitespace_pattern: Optional[Any] = None
    guided_decoding_backend: Optional[Any] = None

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options can only be set when stream is true.",
                           param="stream_options")

    def _sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int],
                         prompt_logprobs: Optional[int], tool_constraint=None,
                         defaults: Optional[dict] = None) -> SamplingParams:
        """defaults: the model's sampling defaults (ModelConfig.sampling_defaults), for the
        fields this request leaves unset; beam search keeps its own."""
        self.check_vllm_fields(self.stream)
        # Beam search is deterministic: its natural temperature is 0, so that is the default.
        default_temperature = 0.0 if self.use_beam_search else 1.0
        fields = sampling_fields(None if self.use_beam_search else defaults, self.temperature, self.top_p,
                                 self.top_k, self.min_p, self.repetition_penalty, default_temperature)
        try:
            return SamplingParams(
                n=self.n, best_of=self.best_of, **fields,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, seed=self.seed,
                use_beam_search=self.use_beam_search, length_penalty=self.length_penalty,
                early_stopping=self.early_stopping, stop=self.stop, stop_token_ids=self.stop_token_ids,
                include_stop_str_in_output=self.include_stop_str_in_output, ignore_eos=self.ignore_eos,
                max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens,
                logit_bias=self.logit_bias, structured_outputs=request_constraint(self, tool_constraint),
                output_kind=output_kind_for(self.stream), **self.vllm_sampling_kwargs())
        except ValueError as exc:
            raise bad_request_from_value_error(exc) from None


def output_kind_for(stream: bool) -> RequestOutputKind:
    """A non-streaming request waits for its end: the engine makes it no output before that
    (vLLM's server asks the same), and its handler is not woken for one."""
    return RequestOutputKind.CUMULATIVE if stream else RequestOutputKind.FINAL_ONLY


# ----------------------------------------------------------------------------- completions
PromptInput = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_SamplingRequest, VllmCompletionFields):
    # Optional as in vLLM, whose prompt_embeds may stand in for it: a request with neither
    # (prompt_embeds is refused here anyway) gets vLLM's message, as an empty prompt does.
    prompt: Optional[PromptInput] = None
    suffix: Optional[str] = None
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False

    @model_validator(mode="after")
    def _has_a_prompt(self) -> "CompletionRequest":
        if self.prompt is None or len(self.prompt) == 0:
            raise APIError(400, EMPTY_PROMPT, param="prompt")
        return self

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt field as a list of prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [p]
        return list(p)

    def to_sampling_params(self, defaults: Optional[dict] = None) -> SamplingParams:
        if self.suffix is not None:
            raise APIError(400, "suffix is not supported: this server does not do fill-in-the-middle.",
                           param="suffix")
        self.check_stream_options()
        # echo with logprobs returns the prompt's logprobs too, as OpenAI's API does.
        prompt_logprobs = self.requested_prompt_logprobs()
        if prompt_logprobs is None and self.echo and self.logprobs is not None:
            prompt_logprobs = self.logprobs
        # echo with max_tokens 0 (vLLM's): the prompt alone comes back, to score it; the engine
        # still takes one step (it generates at least one token), which usage counts, as vLLM.
        max_tokens = 1 if self.echo_only else self.max_tokens
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs, defaults=defaults)

    @property
    def echo_only(self) -> bool:
        return self.echo and self.max_tokens == 0


# ----------------------------------------------------------------------------- chat
class ContentPart(_Strict):
    # A part's other fields (TranslateGemma's source_lang_code...) reach templates that take
    # parts, as vLLM passes them.
    model_config = ConfigDict(strict=True, extra="allow")

    type: str
    text: Optional[str] = None


class ChatMessage(_Strict):
    role: str
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[Any]] = None   # an assistant's earlier calls
    tool_call_id: Optional[str] = None       # a "tool" message answers this call

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text":
                raise APIError(400, f"Content parts of type {part.type!r} are not supported; "
                                    "only 'text' is.", param="messages")
        return "\n".join(part.text or "" for part in self.content)   # vLLM's join of text parts


class ChatCompletionRequest(_SamplingRequest, VllmChatFields):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True
    # Tool calling (tool_calls.py); parallel_tool_calls is accepted and, as in vLLM, ignored.
    tools: Optional[Any] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[Any]] = None   # OpenAI's deprecated form: refused, not ignored
    # OpenAI's; as vLLM, it reaches the chat template as its `reasoning_effort` variable (the
    # templates of reasoning models read it).
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None

    def to_sampling_params(self, tool_constraint=None, defaults: Optional[dict] = None) -> SamplingParams:
        """tool_constraint: the grammar a named or "required" tool_choice forces; defaults: the
        model's sampling defaults."""
        if not self.messages:
            raise APIError(400, "messages must contain at least one message.", param="messages")
        if self.functions:
            raise APIError(400, "functions are not supported by this server; use tools.", param="functions")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs")
        if self.top_logprobs is not None and self.top_logprobs < -1:
            raise APIError(400, f"top_logprobs must be -1 (the whole vocabulary) or at least 0, got "
                                f"{self.top_logprobs}.", param="top_logprobs")
        self.check_stream_options()
        self.check_chat_fields(self.add_generation_prompt)
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, self.requested_prompt_logprobs(), tool_constraint,
                                     defaults)

    def conversation(self) -> list[dict[str, Any]]:
        return conversation_of(self.messages)


def conversation_of(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Request messages as the chat template takes them (content_format.py settles the
    content's shape)."""
    out = []
    for m in messages:
        msg = {"role": m.role, "content": m.text()}
        if isinstance(m.content, list):   # the parts as sent, for templates that take parts
            msg[PARTS_KEY] = [part.model_dump(exclude_none=True) for part in m.content]
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return template_messages(out, messages)


class BatchChatCompletionRequest(ChatCompletionRequest):
    """vLLM's /v1/chat/completions/batch body: the chat fields once, `messages` a list of
    conversations, each run as its own chat request with those fields."""

    messages: list[list[ChatMessage]]

    def single_requests(self) -> list[ChatCompletionRequest]:
        if not self.messages:
            raise APIError(400, "messages must hold at least one conversation.", param="messages")
        # As vLLM's batch: one choice per conversation, nothing streamed, no tools, no beams.
        for name, refused in (("stream", self.stream), ("tools", self.tools),
                              ("use_beam_search", self.use_beam_search), ("n", (self.n or 1) > 1)):
            if refused:
                raise APIError(400, f"{name} is not supported by /v1/chat/completions/batch.", param=name)
        fields = {name: getattr(self, name) for name in ChatCompletionRequest.model_fields if name != "messages"}
        # Fields validated already (the same types as a chat request's): no second validation.
        return [ChatCompletionRequest.model_construct(self.model_fields_set, **fields, messages=conversation)
                for conversation in self.messages]


