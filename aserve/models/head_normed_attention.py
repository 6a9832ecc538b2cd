"""Llama's attention with q and k each normalised head by head, before the rope, by a bias-free
LayerNorm with one weight row per head (Cohere's use_qk_norm, StableLM's qk_layernorm)."""

from __future__ import annotations

from aserve.models.layers.layernorm import PerHeadLayerNorm
from aserve.models.llama import LlamaAttention


class HeadNormedAttention(LlamaAttention):
    def __init__(self, config, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__(config, layer_idx, qkv_bias, o_bias)
        self.q_norm = self.k_norm = None
        if qk_norm:
            eps = config.layer_norm_eps
            self.q_norm = PerHeadLayerNorm(self.num_heads, self.head_dim, eps)
            self.k_norm = PerHeadLayerNorm(self.num_kv_heads, self.head_dim, eps, self.qkv_proj.num_kv_head_replicas)

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        q, k, v = self.split_qkv(hidden_states)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.attend(positions, q, k, v, kv_cache, attn_metadata)
