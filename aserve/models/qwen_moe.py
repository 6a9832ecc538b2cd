"""Qwen's mixtures of experts: Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE
(Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-30B-A3B).

Both put a mixture of SiLU-gated experts in place of the MLP on the layers the config names
sparse (every decoder_sparse_step-th layer, none of mlp_only_layers; a dense MLP of
intermediate_size elsewhere), renormalising the top-k probabilities only where norm_topk_prob
says so. Qwen2-MoE adds a shared expert to every token, scaled by sigmoid(shared_expert_gate(x)),
and q/k/v biases; Qwen3-MoE has Qwen3's attention (an RMSNorm per head of q and k).
"""

from __future__ import annotations

import torch
from torch import nn

from aserve.models.layers import ReplicatedLinear
from aserve.models.layers.moe import CapturableWhenGrouped, MoEBlock
from aserve.models.llama import LlamaForCausalLM, LlamaMLP
from aserve.models.qwen3 import Qwen3Attention


def _is_sparse(config, layer_idx: int) -> bool:
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (layer_idx + 1) % config.decoder_sparse_step == 0)


class _DenseConfig:
    """A config whose intermediate_size is the given one (LlamaMLP reads it from the config)."""

    def __init__(self, config, intermediate_size: int):
        self.hidden_size, self.intermediate_size = config.hidden_size, intermediate_size
        self.hidden_act = config.hidden_act


class QwenMoE(MoEBlock):
    def __init__(self, config, shared_expert: bool):
        super().__init__(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                         config.moe_intermediate_size, renormalize=bool(config.norm_topk_prob),
                         float32_weights=False)
        self.shared_expert = self.shared_expert_gate = None
        if shared_expert:
            # A dense MLP over every token (its down projection all-reduces on its own).
            self.shared_expert = LlamaMLP(_DenseConfig(config, config.shared_expert_intermediate_size), bias=False)
            self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)   # summed over the ranks; the shared expert's down projection sums its own
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def _qwen_mlp(shared_expert: bool):
    def make(config, layer_idx: int) -> nn.Module:
        if _is_sparse(config, layer_idx):
            return QwenMoE(config, shared_expert)
        return LlamaMLP(config, bias=False)
    return make


class Qwen2MoeForCausalLM(CapturableWhenGrouped, LlamaForCausalLM):
    make_mlp = staticmethod(_qwen_mlp(shared_expert=True))

    @staticmethod
    def _biases(config) -> tuple[bool, bool]:
        return getattr(config, "qkv_bias", True), False


class Qwen3MoeForCausalLM(CapturableWhenGrouped, LlamaForCausalLM):
    attention_class = Qwen3Attention
    make_mlp = staticmethod(_qwen_mlp(shared_expert=False))
