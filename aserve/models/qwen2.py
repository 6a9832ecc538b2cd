"""Qwen2: the Llama architecture with a bias on q/k/v (not on o_proj) and optional sliding
windows on the upper layers (only when use_sliding_window is set; see layer_sliding_window)."""

from __future__ import annotations

from aserve.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5 causal LM over the paged KV cache."""

    @staticmethod
    def _biases(config) -> tuple[bool, bool]:
        return True, False
