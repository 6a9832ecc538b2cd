"""SmolLM3 (SmolLM3ForCausalLM: HuggingFaceTB's SmolLM3-3B): Llama whose layers listed as 0 in
the config's no_rope_layers (every fourth by default) attend without any position embedding."""

from __future__ import annotations

from aserve.models.llama import LlamaAttention, LlamaForCausalLM


class SmolLM3Attention(LlamaAttention):
    def __init__(self, config, layer_idx: int, qkv_bias: bool, o_bias: bool):
        super().__init__(config, layer_idx, qkv_bias, o_bias)
        self.uses_rope = bool(config.no_rope_layers[layer_idx])


class SmolLM3ForCausalLM(LlamaForCausalLM):
    attention_class = SmolLM3Attention
