"""Embedding requests on an engine started with runner="pooling" (vLLM's --runner pooling).

A pooling request runs its prompt like any other (chunked prefill, prefix caching, tensor
parallelism); the row that would sample after the prompt's last token returns that token's
final hidden state instead (ModelRunner.pooling), and the request ends there. Its vector is
cut to the request's dimensions and L2-normalised here, when its output is made.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from aserve.outputs import EmbeddingOutput, EmbeddingRequestOutput
from aserve.pooling_params import PoolingParams
from aserve.sampling_params import RequestOutputKind, SamplingParams


def check_runner_takes(params, pooling_runner: bool, hidden_size: int, normalize: bool) -> Optional[PoolingParams]:
    """The request's PoolingParams, with the model's normalising where it asks nothing (None
    for a generation request); ValueError where the request does not fit the engine's runner
    or the model's width."""
    if isinstance(params, PoolingParams):
        if not pooling_runner:
            raise ValueError("embedding requests need a pooling model: start the engine with "
                             "runner='pooling' (the server: --runner pooling).")
        if params.dimensions is not None and params.dimensions > hidden_size:
            raise ValueError(f"dimensions {params.dimensions} is more than the model's embedding size, "
                             f"{hidden_size}.")
        return params if params.normalize is not None else dataclasses.replace(params, normalize=normalize)
    if pooling_runner:
        raise ValueError("this engine pools prompts into embeddings (runner='pooling') and generates no "
                         "text: use embed() or /v1/embeddings.")
    return None


def pooling_as_sampling(pooling: PoolingParams) -> SamplingParams:
    """The engine-side parameters of a pooling request: one row after the prompt, no text."""
    return SamplingParams(max_tokens=1, temperature=0.0, truncate_prompt_tokens=pooling.truncate_prompt_tokens,
                          output_kind=RequestOutputKind.FINAL_ONLY)


def embedding_of(hidden: torch.Tensor, params: PoolingParams) -> list[float]:
    """The request's vector: the first `dimensions` components (checked against the model's
    width when the request was added), L2-normalised unless the request (or, by default, the
    model: Engine.add_request fills it in) says not to."""
    if params.dimensions is not None:
        hidden = hidden[:params.dimensions]
    if params.normalize is not False:
        hidden = torch.nn.functional.normalize(hidden, p=2, dim=0)
    return hidden.tolist()


def pooled_output(request) -> EmbeddingRequestOutput:
    """A pooling request's output: its vector once its prompt has run (a failed or aborted
    request's is empty, with its error)."""
    vector = [] if request.pooled is None else embedding_of(request.pooled, request.pooling_params)
    return EmbeddingRequestOutput(request.request_id, EmbeddingOutput(vector), request.prompt_token_ids,
                                  finished=request.is_finished or request.error is not None,
                                  error=request.error)
