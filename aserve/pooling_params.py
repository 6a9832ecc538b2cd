"""PoolingParams: what an embedding request asks of a model served with runner="pooling"
(vLLM's `--runner pooling`, its `LLM.embed` and `/v1/embeddings`).

The engine runs the prompt and keeps the final hidden state of its last token (last-token
pooling, as decoder-based embedding models use: Qwen3-Embedding, gte-Qwen2, e5-mistral); the
vector is then cut to `dimensions` (Matryoshka models) and L2-normalised unless `normalize`
is False.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["PoolingParams"]


@dataclass
class PoolingParams:
    dimensions: Optional[int] = None          # keep the first N components (then normalise)
    normalize: Optional[bool] = None          # None: the server's pooler config (default True)
    truncate_prompt_tokens: Optional[int] = None   # keep only the prompt's last N tokens

    def __post_init__(self) -> None:
        if self.dimensions is not None and (not isinstance(self.dimensions, int) or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}.")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError(f"truncate_prompt_tokens must be at least 1, got {self.truncate_prompt_tokens}.")
