"""Qwen3: the Llama architecture with an RMSNorm over each head of q and of k (before the rotary
embedding), and no bias on q/k/v unless the config asks for one (`attention_bias`).

The head size is the config's own (`head_dim`, 128 in every Qwen3 checkpoint), not hidden /
heads: Qwen3-0.6B has 16 heads of 128 over a hidden size of 1024.
"""

from __future__ import annotations

from aserve.models.layers import RMSNorm
from aserve.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, config, layer_idx: int, qkv_bias: bool, o_bias: bool):
        super().__init__(config, layer_idx, qkv_bias, o_bias)
        # One scale vector of head_dim shared by all heads, so it is the same on every rank.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        q, k, v = self.split_qkv(hidden_states)
        num_tokens = q.shape[0]
        # Each head's vector is a row of its own for the norm.
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(num_tokens, self.q_size)
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(num_tokens, self.kv_size)
        return self.attend(positions, q, k, v, kv_cache, attn_metadata)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 (dense) causal LM over the paged KV cache."""

    attention_class = Qwen3Attention
