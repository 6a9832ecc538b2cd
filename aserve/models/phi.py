"""Phi (PhiForCausalLM: Microsoft's phi-1, phi-1.5 and phi-2, and fine-tunes).

Each layer runs attention and its MLP side by side on one LayerNorm of its input and adds
both to it: x + attn(ln(x)) + mlp(ln(x)). Attention is rotary on a share of each head (the
partial rotary factor: phi-2 0.4), with biases on every projection and, where the config's
qk_layernorm says, a LayerNorm over each head of q and k; the MLP is fc1, a GELU, fc2; the LM
head has a bias.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from aserve.models.decoder_lm import QKV_GATE_UP_SHARDS, DecoderOnlyLM
from aserve.models.layers import ColumnParallelLinear, LayerNorm, RowParallelLinear, get_act_fn, load_named_weights
from aserve.models.llama import LlamaAttention


class PhiAttention(LlamaAttention):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx, True, True)
        self.q_layernorm = self.k_layernorm = None
        if getattr(config, "qk_layernorm", False):
            self.q_layernorm = LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = LayerNorm(self.head_dim, eps=config.layer_norm_eps)

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        q, k, v = self.split_qkv(hidden_states)
        if self.q_layernorm is not None:   # each head on its own: local to a tensor-parallel rank
            q = self.q_layernorm(q.reshape(-1, self.head_dim)).view(q.shape[0], self.q_size)
            k = self.k_layernorm(k.reshape(-1, self.head_dim)).view(k.shape[0], self.kv_size)
        return self.attend(positions, q, k, v, kv_cache, attn_metadata)


class PhiMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size)
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size)
        self.act = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = PhiAttention(config, layer_idx)
        self.mlp = PhiMLP(config)
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        normed = self.input_layernorm(hidden_states)
        # transformers' order of the two adds, so the roundings match.
        return self.self_attn(positions, normed, kv_cache, attn_metadata) + self.mlp(normed) + hidden_states


class PhiForCausalLM(DecoderOnlyLM):
    def make_layer(self, config, index: int) -> nn.Module:
        return PhiDecoderLayer(config, index)

    def make_norm(self, config) -> nn.Module:
        return LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def lm_head_bias(self, config) -> bool:
        return True

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def rename(name: str) -> Optional[str]:
            if (self.tied and name == "lm_head.weight") or "rotary_emb.inv_freq" in name:
                return None
            name = name[len("model."):] if name.startswith("model.") else name
            return name.replace("final_layernorm.", "norm.").replace(".self_attn.dense.", ".self_attn.o_proj.")

        load_named_weights(self, weights, QKV_GATE_UP_SHARDS, rename)
