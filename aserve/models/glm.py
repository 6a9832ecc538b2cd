"""GLM (GlmForCausalLM: THUDM's glm-4-9b-chat-hf) and GLM-4 (Glm4ForCausalLM: GLM-4-9B-0414,
GLM-4-32B-0414, GLM-Z1).

Llama's layers with biases on q, k and v (none on o), a merged gate/up projection in the
checkpoint, and a rotary embedding on the first half of each head that rotates interleaved
pairs: q's and k's rows are reordered on load (rotary.interleaved_pairs_to_halves), which
leaves the scores exactly GLM's. GLM-4 adds an RMSNorm after attention and one after the MLP,
each before its residual add.
"""

from __future__ import annotations

from typing import Iterable

import torch

from aserve.models.layers import RMSNorm
from aserve.models.layers.rotary import interleaved_pairs_to_halves
from aserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class GlmForCausalLM(LlamaForCausalLM):
    @staticmethod
    def _biases(config) -> tuple[bool, bool]:
        return bool(getattr(config, "attention_bias", True)), False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        rotary = self.model.layers[0].self_attn.rotary_emb
        super().load_weights(interleaved_pairs_to_halves(weights, rotary.head_dim, rotary.rotary_dim))


class Glm4DecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, *args):
        super().__init__(config, *args)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual, kv_cache, attn_metadata):
        # Llama's fused residual adds, each sublayer's output normalised first.
        hidden_states, residual = self.normed_input(hidden_states, residual)
        attended = self.post_self_attn_layernorm(self.self_attn(positions, hidden_states, kv_cache, attn_metadata))
        hidden_states, residual = self.post_attention_layernorm(attended, residual)
        return self.post_mlp_layernorm(self.mlp(hidden_states)), residual


class Glm4ForCausalLM(GlmForCausalLM):
    decoder_layer_class = Glm4DecoderLayer
