"""StarCoder2 (Starcoder2ForCausalLM: bigcode's starcoder2-3b/7b/15b and fine-tunes).

Pre-norm decoder layers like Llama's, with LayerNorm (weight and bias) instead of RMSNorm, a
plain two-layer MLP (c_fc, a tanh GELU, c_proj) instead of a gated one, biases on every
projection when the config's use_bias says so, grouped-query rotary attention and the config's
sliding window.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from aserve.attention import AttentionMetadata
from aserve.models.layers import (ColumnParallelLinear, LayerNorm, ParallelLMHead, RowParallelLinear,
                                  VocabParallelEmbedding, get_act_fn, load_named_weights)
from aserve.models.llama import LlamaAttention


class Starcoder2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=config.use_bias)
        self.c_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=config.use_bias)
        self.act = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Starcoder2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, config.use_bias, config.use_bias)
        self.mlp = Starcoder2MLP(config)
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.norm_epsilon)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=config.norm_epsilon)

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        hidden_states = hidden_states + self.self_attn(positions, self.input_layernorm(hidden_states),
                                                       kv_cache, attn_metadata)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Starcoder2ForCausalLM(nn.Module):
    def __init__(self, hf_config):
        super().__init__()
        self.config = hf_config
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        self.layers = nn.ModuleList(Starcoder2DecoderLayer(hf_config, i) for i in range(hf_config.num_hidden_layers))
        self.norm = LayerNorm(hf_config.hidden_size, eps=hf_config.norm_epsilon)
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size)
        self.tied = bool(getattr(hf_config, "tie_word_embeddings", True))
        if self.tied:
            self.lm_head.tie_weights(self.embed_tokens)
        attn = self.layers[0].self_attn
        self.num_layers = hf_config.num_hidden_layers
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden_states = layer(positions, hidden_states, kv_cache, attn_metadata)
        return self.norm(hidden_states)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.get_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        stacked = [(".qkv_proj.", ".q_proj.", "q"), (".qkv_proj.", ".k_proj.", "k"), (".qkv_proj.", ".v_proj.", "v")]

        def rename(name: str) -> Optional[str]:
            if self.tied and name == "lm_head.weight":
                return None
            if "rotary_emb.inv_freq" in name:
                return None
            return name[len("model."):] if name.startswith("model.") else name

        load_named_weights(self, weights, stacked, rename)
