"""StableLM (StableLmForCausalLM: stablelm-2-1_6b and -12b, stablelm-3b-4e1t, stablelm-zephyr-3b,
stable-code-3b): Llama's attention and SiLU-gated MLP in LayerNorm (weight and bias) layers, a
rotary embedding on a quarter of each head, q/k/v biases where use_qkv_bias says, and in
stablelm-2-12b a LayerNorm over each head of q and k (qk_layernorm, one weight row per head)
with attention and MLP side by side on one norm (use_parallel_residual).
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
from torch import nn

from aserve.models.decoder_lm import QKV_GATE_UP_SHARDS, DecoderOnlyLM
from aserve.models.head_normed_attention import HeadNormedAttention
from aserve.models.layers import LayerNorm, load_named_weights
from aserve.models.llama import LlamaMLP

# One head's q or k norm in the checkpoint: ...self_attn.q_layernorm.norms.3.weight
_HEAD_NORM = re.compile(r"^(?P<attn>.*\.self_attn)\.(?P<which>[qk])_layernorm\.norms\.(?P<head>\d+)\.weight$")


class StableLmAttention(HeadNormedAttention):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx, bool(getattr(config, "use_qkv_bias", False)), False,
                         bool(getattr(config, "qk_layernorm", False)))


class StableLmDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = StableLmAttention(config, layer_idx)
        self.mlp = LlamaMLP(config, bias=False)
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.parallel_residual = bool(getattr(config, "use_parallel_residual", False))
        self.post_attention_layernorm = (None if self.parallel_residual
                                         else LayerNorm(config.hidden_size, eps=config.layer_norm_eps))

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        normed = self.input_layernorm(hidden_states)
        attended = self.self_attn(positions, normed, kv_cache, attn_metadata)
        if self.parallel_residual:   # transformers' order of the adds
            return hidden_states + attended + self.mlp(normed)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class StableLmForCausalLM(DecoderOnlyLM):
    def make_layer(self, config, index: int) -> nn.Module:
        return StableLmDecoderLayer(config, index)

    def make_norm(self, config) -> nn.Module:
        return LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def rename(name: str) -> Optional[str]:
            if (self.tied and name == "lm_head.weight") or "rotary_emb.inv_freq" in name:
                return None
            return name[len("model."):] if name.startswith("model.") else name

        load_named_weights(self, weights, QKV_GATE_UP_SHARDS, rename, route=_head_norm)


def _head_norm(name: str) -> Optional[tuple[str, int]]:
    """(the per-head norm's parameter, the head) of one head's q or k norm weight."""
    match = _HEAD_NORM.match(name)
    return None if match is None else (f"{match['attn']}.{match['which']}_norm.weight", int(match["head"]))
