"""Gemma, Gemma 2 and Gemma 3 (text: Gemma3ForCausalLM, e.g. gemma-3-1b-it).

What sets them apart from Llama, all as transformers computes it:
- the token embeddings are scaled by sqrt(hidden_size), rounded to the model's dtype;
- RMSNorm scales by (1 + weight), in float32 before the cast back;
- a GELU (tanh) gated MLP;
- Gemma 2 and 3 normalise each sublayer's output too (post_attention_layernorm before the
  residual add, pre/post_feedforward_layernorm around the MLP), scale queries by
  query_pre_attn_scalar^-0.5 and alternate sliding-window and full layers (layer_types);
- Gemma 2 caps attention scores (attn_logit_softcapping) and the final logits
  (final_logit_softcapping) as cap * tanh(x / cap); capped attention runs in the torch
  reference (layers/attention.py), so such a model runs without decode CUDA graphs;
- Gemma 3 normalises each head of q and k, and its sliding and full layers have rotary
  settings of their own (rope_parameters per layer type).
"""

from __future__ import annotations

import torch
from torch import nn

from aserve.models.decoder_lm import DecoderOnlyLM
from aserve.models.layers import (Attention, MergedColumnParallelLinear, QKVParallelLinear, RotaryEmbedding,
                                  RowParallelLinear, default_weight_loader)
from aserve.models.layers.activation import ActAndMul
from aserve.models.layers.rotary import layer_rope_parameters
from aserve.models.llama import layer_sliding_window


class GemmaRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + weight), in float32, then cast back (HF's)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class GemmaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, qk_norm: bool):
        super().__init__()
        total_heads, total_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads, total_kv_heads, bias=bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, bias=bias)
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.max_position_embeddings,
                                          layer_rope_parameters(config, layer_idx))
        scalar = getattr(config, "query_pre_attn_scalar", None) or self.head_dim
        self.attn = Attention(self.num_heads, self.head_dim, scalar ** -0.5, self.num_kv_heads,
                              layer_sliding_window(config, layer_idx),
                              getattr(config, "attn_logit_softcapping", None))
        self.q_norm = self.k_norm = None
        if qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            num_tokens = qkv.shape[0]
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(num_tokens, self.q_size)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(num_tokens, self.kv_size)
        return self.o_proj(self.attn(q, k, v, kv_cache, attn_metadata, self.rotary_emb, positions))


class GemmaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=False)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=False)
        # Gemma's config names it hidden_activation (hidden_act in the first Gemma's).
        self.act_fn = ActAndMul(getattr(config, "hidden_activation", None) or config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, sandwich: bool, qk_norm: bool):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = GemmaAttention(config, layer_idx, qk_norm)
        self.mlp = GemmaMLP(config)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.sandwich = sandwich   # Gemma 2 and 3: each sublayer's output is normalised too
        if sandwich:
            self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        attended = self.self_attn(positions, self.input_layernorm(hidden_states), kv_cache, attn_metadata)
        if not self.sandwich:
            hidden_states = hidden_states + attended
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = hidden_states + self.post_attention_layernorm(attended)
        mlp_out = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        return hidden_states + self.post_feedforward_layernorm(mlp_out)


class GemmaForCausalLM(DecoderOnlyLM):
    """Gemma over the paged KV cache (Gemma2ForCausalLM and Gemma3ForCausalLM subclass it)."""

    sandwich = False
    qk_norm = False

    def __init__(self, hf_config):
        super().__init__(hf_config)
        self.final_logit_softcapping = getattr(hf_config, "final_logit_softcapping", None)
        # Capped attention scores run in the torch reference, which plans on the host.
        self.supports_decode_graphs = getattr(hf_config, "attn_logit_softcapping", None) is None

    def make_layer(self, config, index: int) -> nn.Module:
        return GemmaDecoderLayer(config, index, self.sandwich, self.qk_norm)

    def make_norm(self, config) -> nn.Module:
        return GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def tie_embeddings(self, config) -> bool:
        return True   # every Gemma ties its LM head to the embedding

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        # HF multiplies by sqrt(hidden) rounded to the embedding's dtype (33.94 -> 34.0 in bf16).
        return hidden_states * torch.tensor(self.config.hidden_size ** 0.5, dtype=hidden_states.dtype)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.get_logits(hidden_states)
        cap = self.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


class Gemma2ForCausalLM(GemmaForCausalLM):
    sandwich = True


class Gemma3ForCausalLM(GemmaForCausalLM):
    sandwich = True
    qk_norm = True
