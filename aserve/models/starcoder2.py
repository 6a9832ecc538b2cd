"""StarCoder2 (Starcoder2ForCausalLM: bigcode's starcoder2-3b/7b/15b and fine-tunes).

Pre-norm decoder layers like Llama's, with LayerNorm (weight and bias) instead of RMSNorm, a
plain two-layer MLP (c_fc, a tanh GELU, c_proj) instead of a gated one, biases on every
projection when the config's use_bias says so, grouped-query rotary attention and the config's
sliding window.
"""

from __future__ import annotations

import torch
from torch import nn

from aserve.models.decoder_lm import DecoderOnlyLM
from aserve.models.layers import ColumnParallelLinear, LayerNorm, RowParallelLinear, get_act_fn
from aserve.models.llama import LlamaAttention


class Starcoder2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=config.use_bias)
        self.c_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=config.use_bias)
        self.act = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Starcoder2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, config.use_bias, config.use_bias)
        self.mlp = Starcoder2MLP(config)
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.norm_epsilon)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=config.norm_epsilon)

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        hidden_states = hidden_states + self.self_attn(positions, self.input_layernorm(hidden_states),
                                                       kv_cache, attn_metadata)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Starcoder2ForCausalLM(DecoderOnlyLM):
    def make_layer(self, config, index: int) -> nn.Module:
        return Starcoder2DecoderLayer(config, index)

    def make_norm(self, config) -> nn.Module:
        return LayerNorm(config.hidden_size, eps=config.norm_epsilon)

    def tie_embeddings(self, config) -> bool:
        return bool(getattr(config, "tie_word_embeddings", True))   # the checkpoints tie
