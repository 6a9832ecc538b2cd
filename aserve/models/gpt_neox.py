"""GPT-NeoX (GPTNeoXForCausalLM: EleutherAI's Pythia suite and GPT-NeoX-20B, and fine-tunes
such as Dolly v2 and RedPajama-INCITE).

Pre-LayerNorm decoder layers with multi-head rotary attention on a share of each head (the
partial rotary factor, a quarter in Pythia) and a plain two-layer GELU MLP. With
use_parallel_residual (the default, and Pythia's) attention and MLP read the same input:
x + attn(ln1(x)) + mlp(ln2(x)); without it they run one after the other, as Llama's do. The
checkpoint's query_key_value matrix holds each head's q, k and v rows together; it is split
into the fused QKV layer's q, k and v shards on load, so tensor parallelism shards it by head
like every other family.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from aserve.models.decoder_lm import QKV_GATE_UP_SHARDS, DecoderOnlyLM
from aserve.models.layers import ColumnParallelLinear, LayerNorm, RowParallelLinear, get_act_fn, load_named_weights
from aserve.models.llama import LlamaAttention


class GPTNeoXMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = RowParallelLinear(config.intermediate_size, config.hidden_size)
        self.act = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        bias = getattr(config, "attention_bias", True)
        self.self_attn = LlamaAttention(config, layer_idx, bias, bias)
        self.mlp = GPTNeoXMLP(config)
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.parallel_residual = getattr(config, "use_parallel_residual", True)

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        attn = self.self_attn(positions, self.input_layernorm(hidden_states), kv_cache, attn_metadata)
        if self.parallel_residual:
            # transformers adds mlp + attn first, then the input: the same order of roundings.
            return self.mlp(self.post_attention_layernorm(hidden_states)) + attn + hidden_states
        hidden_states = attn + hidden_states
        return self.mlp(self.post_attention_layernorm(hidden_states)) + hidden_states


# Checkpoint names (gpt_neox.*, embed_out) as this module tree names them.
_RENAMES = (("gpt_neox.embed_in.", "embed_tokens."), ("gpt_neox.final_layer_norm.", "norm."),
            ("gpt_neox.layers.", "layers."), (".attention.dense.", ".self_attn.o_proj."),
            ("embed_out.", "lm_head."))
# Buffers some checkpoints saved (the causal mask, rotary tables): recomputed here.
_BUFFERS = (".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")


class GPTNeoXForCausalLM(DecoderOnlyLM):
    def make_layer(self, config, index: int) -> nn.Module:
        return GPTNeoXLayer(config, index)

    def make_norm(self, config) -> nn.Module:
        return LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def rename(name: str) -> Optional[str]:
            if name.endswith(_BUFFERS) or (self.tied and name == "embed_out.weight"):
                return None
            for old, new in _RENAMES:
                name = name.replace(old, new)
            return name

        load_named_weights(self, _split_query_key_value(weights, self.config), QKV_GATE_UP_SHARDS, rename)


def _split_query_key_value(weights: Iterable[tuple[str, torch.Tensor]], config) -> Iterator[tuple[str, torch.Tensor]]:
    """Each layer's query_key_value weight [heads * 3 * head_dim, hidden] (and bias), whose rows
    run q, k, v head by head, as three tensors named q_proj, k_proj and v_proj."""
    heads = config.num_attention_heads
    for name, tensor in weights:
        if ".attention.query_key_value." not in name:
            yield name, tensor
            continue
        per_head = tensor.reshape(heads, 3, -1, *tensor.shape[1:])   # [heads, q/k/v, head_dim, ...]
        for index, part in enumerate(("q_proj", "k_proj", "v_proj")):
            yield (name.replace(".attention.query_key_value.", f".self_attn.{part}."),
                   per_head[:, index].reshape(-1, *tensor.shape[1:]))
