"""Phi-3 and Phi-4 (Phi3ForCausalLM: Phi-3-mini-4k, Phi-3-medium, Phi-4, Phi-4-reasoning): the
Llama architecture whose checkpoints store q/k/v as one qkv_proj and gate/up as one
gate_up_proj matrix (the fused layers take them whole), with no biases and the config's
sliding window (Phi-3-mini-4k: 2047).

Phi-3.5-mini, Phi-3-mini-128k and Phi-4-mini use LongRoPE (layers/rotary.py): one set of
frequency factors for every position, the long set when the engine serves contexts past the
original 4k, as vLLM chooses (transformers switches per call, so the two agree while a sequence
stays on one side of that length). Phi-4-mini also rotates a share of each head."""

from __future__ import annotations

from aserve.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def _biases(config) -> tuple[bool, bool]:
        return False, False
