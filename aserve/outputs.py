"""What a request returns: RequestOutput with one CompletionOutput per returned sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from aserve.logprobs import FlatLogprobs, Logprob, PromptLogprobs, SampleLogprobs

__all__ = ["CompletionOutput", "EmbeddingOutput", "EmbeddingRequestOutput", "RequestOutput", "RequestMetrics",
           "Logprob", "FlatLogprobs", "SampleLogprobs", "PromptLogprobs"]


@dataclass
class CompletionOutput:
    """One generated sample of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[SampleLogprobs]
    finish_reason: Optional[str] = None  # 'stop' | 'length' | 'abort' | None while running
    stop_reason: Union[int, str, None] = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request: its prompt and its samples, cumulative so far."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    prompt_logprobs: Optional[PromptLogprobs]
    outputs: list[CompletionOutput]
    finished: bool
    # Set when the request failed inside the engine; the message says why.
    error: Optional[str] = None
    metrics: Optional["RequestMetrics"] = None
    # Prompt tokens whose KV came from the prefix cache (None before the request is scheduled).
    num_cached_tokens: Optional[int] = None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.monotonic) of a request's life, for latency metrics."""

    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_generation_tokens: int = 0


@dataclass
class EmbeddingOutput:
    """A pooled prompt (vLLM's EmbeddingOutput): the vector, as floats."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """What an embedding request returns (runner="pooling"; vLLM's EmbeddingRequestOutput)."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True
    error: Optional[str] = None
