"""IBM Granite (GraniteForCausalLM: granite-3.x, granite-3.1/3.2/3.3 instruct): Llama with four
scalars from the config, applied where transformers applies them: the embeddings times
embedding_multiplier, each sublayer's output times residual_multiplier before its residual
add, attention scores scaled by attention_multiplier (instead of head_dim^-0.5), and the
logits divided by logits_scaling."""

from __future__ import annotations

import torch

from aserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class GraniteDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, *args):
        super().__init__(config, *args)
        self.residual_multiplier = config.residual_multiplier
        self.self_attn.attn.scale = config.attention_multiplier

    def forward(self, positions, hidden_states, residual, kv_cache, attn_metadata):
        # Llama's fused residual adds, each sublayer's output scaled first (HF: residual + h * m).
        hidden_states, residual = self.normed_input(hidden_states, residual)
        attended = self.self_attn(positions, hidden_states, kv_cache, attn_metadata) * self.residual_multiplier
        hidden_states, residual = self.post_attention_layernorm(attended, residual)
        return self.mlp(hidden_states) * self.residual_multiplier, residual


class GraniteForCausalLM(LlamaForCausalLM):
    decoder_layer_class = GraniteDecoderLayer

    def __init__(self, hf_config):
        super().__init__(hf_config)
        self.model.embedding_multiplier = hf_config.embedding_multiplier

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden_states) / self.config.logits_scaling
