"""EXAONE 4.0 (Exaone4ForCausalLM: LG AI Research's EXAONE-4.0-1.2B and -32B).

OLMo 2's layer arrangement (an RMSNorm after attention and after the MLP, each before its
residual add) with Qwen3's attention (an RMSNorm over each head of q and k). The 32B model
alternates three sliding-window layers with one full-attention layer, and its full layers take
no position embedding; a model without sliding layers (the 1.2B) is rotary throughout. The rope
follows the config's layer_types rather than its sliding_window, so --disable-sliding-window
drops the windows without changing which layers rotate.
"""

from __future__ import annotations

from torch import nn

from aserve.models.decoder_lm import DecoderOnlyLM
from aserve.models.layers import RMSNorm
from aserve.models.llama import LlamaMLP
from aserve.models.qwen3 import Qwen3Attention


class Exaone4Attention(Qwen3Attention):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx, False, False)
        layer_types = getattr(config, "layer_types", None) or []
        self.uses_rope = "sliding_attention" not in layer_types or layer_types[layer_idx] == "sliding_attention"


class Exaone4DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = Exaone4Attention(config, layer_idx)
        self.mlp = LlamaMLP(config, bias=False)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        attended = self.self_attn(positions, hidden_states, kv_cache, attn_metadata)
        hidden_states = hidden_states + self.post_attention_layernorm(attended)
        return hidden_states + self.post_feedforward_layernorm(self.mlp(hidden_states))


class Exaone4ForCausalLM(DecoderOnlyLM):
    def make_layer(self, config, index: int) -> nn.Module:
        return Exaone4DecoderLayer(config, index)

    def make_norm(self, config) -> nn.Module:
        return RMSNorm(config.hidden_size, config.rms_norm_eps)
