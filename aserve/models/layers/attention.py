"""The attention layer every model uses: reshapes, then defers to the attention backend."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from aserve.attention import AttentionMetadata, get_attention_backend
from aserve.attention.torch_ref import TorchReferenceBackend


class Attention(nn.Module):
    """Causal attention of this step's queries over the paged KV cache.

    The backend (torch reference or CUDA kernels) is picked on the first forward from the
    query's device, so a model may be built before it is moved to its device.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float,
                 num_kv_heads: Optional[int] = None, sliding_window: Optional[int] = None,
                 logits_soft_cap: Optional[float] = None):
        super().__init__()
        # Gemma 2's capped scores: only the torch reference computes them (on a GPU too).
        self.logits_soft_cap = logits_soft_cap
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads or num_heads
        assert self.num_heads % self.num_kv_heads == 0, "query heads must be a multiple of KV heads"
        self.sliding_window = sliding_window
        self.backend = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata, rotary=None, positions: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """q [T, H*D], k/v [T, KVH*D] -> [T, H*D]; this step's k/v are written to kv_cache.
        rotary (a RotaryEmbedding) rotates q and k at `positions` first: on the CUDA backend
        in the same kernel as the cache write (one launch a layer fewer at every step)."""
        if self.backend is None:
            self.backend = (TorchReferenceBackend() if self.logits_soft_cap is not None
                            else get_attention_backend(q.device, self.head_dim))
        kv_cached = False
        if rotary is not None:
            kv_cached = self.backend.fuses_rotary and rotary.rotate_and_cache(
                positions, q, k, v, kv_cache, attn_metadata.slot_mapping)
            if not kv_cached:
                q, k = rotary(positions, q, k)
        num_tokens = q.shape[0]
        query = q.view(num_tokens, self.num_heads, self.head_dim)
        key = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        capped = {} if self.logits_soft_cap is None else {"logits_soft_cap": self.logits_soft_cap}
        out = self.backend.forward(query, key, value, kv_cache, attn_metadata, self.scale,
                                   self.sliding_window, kv_cached=kv_cached, **capped)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
