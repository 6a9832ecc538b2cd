"""Arcee (ArceeForCausalLM: arcee-ai's AFM-4.5B): Llama's layers with a plain two-layer MLP
(up_proj, a squared ReLU, down_proj) in place of the gated one."""

from __future__ import annotations

import torch
from torch import nn

from aserve.models.decoder_lm import QKV_SHARDS
from aserve.models.layers import ColumnParallelLinear, RowParallelLinear, get_act_fn
from aserve.models.llama import LlamaForCausalLM


class ArceeMLP(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.up_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class ArceeForCausalLM(LlamaForCausalLM):
    make_mlp = staticmethod(ArceeMLP)
    stacked_shards = QKV_SHARDS   # up_proj stays up_proj
