"""OLMo 2 and OLMo 3 (Olmo2ForCausalLM, Olmo3ForCausalLM: AllenAI's open models).

Llama's attention and MLP, arranged differently:
- norms after each sublayer, not before: h = h + post_attention_layernorm(attn(h)), then
  h = h + post_feedforward_layernorm(mlp(h));
- an RMSNorm over the whole q projection and over the whole k projection (all heads at once,
  before the rotary embedding), which with tensor parallelism spans the ranks: each rank's
  sum of squares is all-reduced before it divides;
- RMSNorm scales in float32 before the cast back;
- OLMo 3 alternates sliding-window and full layers, each type with its own rotary settings.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from aserve.distributed import current_group
from aserve.models.decoder_lm import DecoderOnlyLM
from aserve.models.layers import Attention, QKVParallelLinear, RotaryEmbedding, RowParallelLinear, default_weight_loader
from aserve.models.layers.rotary import layer_rope_parameters
from aserve.models.llama import LlamaMLP, layer_sliding_window


class Olmo2RMSNorm(nn.Module):
    """weight * x * rsqrt(mean(x^2) + eps), in float32, then cast back (HF's Olmo2RMSNorm).
    sharded: x is this rank's slice of a vector split over the tensor-parallel ranks (q's or
    k's heads); the mean is over the whole vector, and the weight is this rank's slice
    (shard_of_rank gives which: a k head replicated over ranks has its copy's slice)."""

    def __init__(self, size: int, eps: float, sharded: bool = False, shard_of_rank: Optional[int] = None,
                 weight_in_float32: bool = True):
        super().__init__()
        self.tp = current_group()
        # OLMo 2 scales in float32 and casts after; OLMoE casts first, then scales (as Llama).
        self.weight_in_float32 = weight_in_float32
        self.sharded = sharded and self.tp.world_size > 1
        self.shard_of_rank = self.tp.rank if shard_of_rank is None else shard_of_rank
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader if self.sharded else default_weight_loader
        self.eps = eps

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.shard_of_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        squares = h.pow(2).sum(-1, keepdim=True)
        count = h.shape[-1]
        if self.sharded:
            # Replicated k heads count once per copy on both sides of the division.
            squares = self.tp.all_reduce(squares)
            count *= self.tp.world_size
        h = h * torch.rsqrt(squares / count + self.eps)
        return (self.weight * h).to(x.dtype) if self.weight_in_float32 else self.weight * h.to(x.dtype)


class Olmo2Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads, total_kv_heads, bias=bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, bias=bias)
        tp = current_group()
        self.q_norm = Olmo2RMSNorm(self.q_size, config.rms_norm_eps, sharded=True)
        self.k_norm = Olmo2RMSNorm(self.kv_size, config.rms_norm_eps, sharded=True,
                                   shard_of_rank=tp.rank // self.qkv_proj.num_kv_head_replicas)
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.max_position_embeddings,
                                          layer_rope_parameters(config, layer_idx))
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads,
                              layer_sliding_window(config, layer_idx))

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(self.attn(q, k, v, kv_cache, attn_metadata, self.rotary_emb, positions))


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = Olmo2Attention(config, layer_idx)
        self.mlp = LlamaMLP(config, bias=False)
        self.post_attention_layernorm = Olmo2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = Olmo2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        attended = self.self_attn(positions, hidden_states, kv_cache, attn_metadata)
        hidden_states = hidden_states + self.post_attention_layernorm(attended)
        return hidden_states + self.post_feedforward_layernorm(self.mlp(hidden_states))


class Olmo2ForCausalLM(DecoderOnlyLM):
    """OLMo 2 over the paged KV cache (Olmo3ForCausalLM is the same module tree)."""

    def make_layer(self, config, index: int) -> nn.Module:
        return Olmo2DecoderLayer(config, index)

    def make_norm(self, config) -> nn.Module:
        return Olmo2RMSNorm(config.hidden_size, config.rms_norm_eps)


Olmo3ForCausalLM = Olmo2ForCausalLM
