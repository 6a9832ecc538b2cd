"""Mixtral: Mistral's attention with a mixture of SiLU-gated experts in place of each MLP
(a router picks 2 of 8 experts per token; their probabilities are renormalised over the two)."""

from __future__ import annotations

from aserve.models.layers.moe import CapturableWhenGrouped, MoEBlock
from aserve.models.llama import LlamaForCausalLM


class MixtralMoE(MoEBlock):
    def __init__(self, config, layer_idx: int):
        super().__init__(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                         config.intermediate_size, renormalize=True, float32_weights=True)


class MixtralForCausalLM(CapturableWhenGrouped, LlamaForCausalLM):
    """Mixtral-8x7B, Mixtral-8x22B and their fine-tunes over the paged KV cache."""

    make_mlp = staticmethod(MixtralMoE)

    @staticmethod
    def checkpoint_name(name: str) -> str:
        return name.replace(".block_sparse_moe.", ".mlp.")
