"""OLMo (OlmoForCausalLM: AllenAI's OLMo-1B-hf, OLMo-7B-hf, OLMo-7B-0424-hf): Llama's attention
and gated MLP in pre-norm layers whose LayerNorms have no weight and no bias, with q, k and v
clamped to clip_qkv where the config sets it."""

from __future__ import annotations

from torch import nn

from aserve.models.decoder_lm import DecoderOnlyLM
from aserve.models.layers import LayerNorm
from aserve.models.llama import LlamaAttention, LlamaMLP


def _norm(config) -> LayerNorm:
    return LayerNorm(config.hidden_size, eps=1e-5, elementwise_affine=False)   # transformers' fixed eps


class OlmoAttention(LlamaAttention):
    def __init__(self, config, layer_idx: int):
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, layer_idx, bias, bias)
        self.clip = getattr(config, "clip_qkv", None)

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        q, k, v = self.split_qkv(hidden_states)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        return self.attend(positions, q, k, v, kv_cache, attn_metadata)


class OlmoDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = OlmoAttention(config, layer_idx)
        self.mlp = LlamaMLP(config, bias=False)
        self.input_layernorm = _norm(config)
        self.post_attention_layernorm = _norm(config)

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        hidden_states = hidden_states + self.self_attn(positions, self.input_layernorm(hidden_states),
                                                       kv_cache, attn_metadata)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class OlmoForCausalLM(DecoderOnlyLM):
    def make_layer(self, config, index: int) -> nn.Module:
        return OlmoDecoderLayer(config, index)

    def make_norm(self, config) -> nn.Module:
        return _norm(config)
