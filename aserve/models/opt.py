"""OPT (facebook/opt-*): learned absolute positions, LayerNorm before (or, for opt-350m, after)
each block, ReLU MLP, and for some sizes an embedding smaller than the hidden size that is
projected in and out (project_in / project_out)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from aserve.attention import AttentionMetadata
from aserve.models.layers import (Attention, ColumnParallelLinear, LayerNorm, ParallelLMHead,
                                  QKVParallelLinear, ReplicatedLinear, RowParallelLinear,
                                  VocabParallelEmbedding, get_act_fn, load_named_weights)
from aserve.models.layers.linear import fused_linear

# OPT's position table has two extra leading rows (a fairseq padding-index legacy).
_POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, total_heads = config.hidden_size, config.num_attention_heads
        self.head_dim = hidden // total_heads
        bias = getattr(config, "enable_bias", True)
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, total_heads, total_heads, bias=bias)
        self.num_heads = self.num_kv_heads = self.qkv_proj.num_heads
        self.size = self.num_heads * self.head_dim
        self.out_proj = RowParallelLinear(hidden, hidden, bias=bias)
        # HF scales q before the dot product (not the scores); do the same to match its rounding.
        self.scaling = self.head_dim ** -0.5
        self.attn = Attention(self.num_heads, self.head_dim, 1.0, self.num_kv_heads)

    def forward(self, hidden_states, kv_cache, attn_metadata, residual):
        """residual + attention(hidden_states). In a decode step the query scaling and the
        residual add run in the GEMVs' epilogues (two kernels fewer a layer, same bits)."""
        qkv = fused_linear(hidden_states, self.qkv_proj, scaled=self.size, scale=self.scaling)
        if qkv is not None:
            q, k, v = qkv.split([self.size] * 3, dim=-1)
        else:
            q, k, v = self.qkv_proj(hidden_states).split([self.size] * 3, dim=-1)
            q = q * self.scaling
        attn = self.attn(q, k, v, kv_cache, attn_metadata)
        out = fused_linear(attn, self.out_proj, residual=residual)
        return out if out is not None else residual + self.out_proj(attn)


class OPTDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        bias = getattr(config, "enable_bias", True)
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear(hidden, config.ffn_dim, bias=bias)
        self.fc2 = RowParallelLinear(config.ffn_dim, hidden, bias=bias)
        self.activation_fn = get_act_fn(config.activation_function)
        self.act_is_relu = config.activation_function == "relu"   # foldable into fc1's GEMV
        self.final_layer_norm = LayerNorm(hidden, elementwise_affine=affine)

    def forward(self, hidden_states, kv_cache, attn_metadata):
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states = self.self_attn(hidden_states, kv_cache, attn_metadata, residual)
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = self._mlp(hidden_states, residual)
        if not self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states

    def _mlp(self, hidden_states, residual):
        """residual + fc2(act(fc1(hidden_states))); in a decode step ReLU and the residual add
        run in the GEMVs' epilogues."""
        up = fused_linear(hidden_states, self.fc1, relu=True) if self.act_is_relu else None
        if up is None:
            up = self.activation_fn(self.fc1(hidden_states))
        out = fused_linear(up, self.fc2, residual=residual)
        return out if out is not None else residual + self.fc2(up)


class OPTDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, proj_dim = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, proj_dim)
        self.embed_positions = VocabParallelEmbedding(config.max_position_embeddings + _POSITION_OFFSET,
                                                      hidden)
        self.project_in = ReplicatedLinear(proj_dim, hidden, bias=False) if proj_dim != hidden else None
        self.project_out = ReplicatedLinear(hidden, proj_dim, bias=False) if proj_dim != hidden else None
        # Post-LN models (opt-350m) have no final LayerNorm; HF's _remove_final_layer_norm is a
        # legacy switch for checkpoints fine-tuned before transformers 4.20.
        if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False):
            affine = getattr(config, "layer_norm_elementwise_affine", True)
            self.final_layer_norm = LayerNorm(hidden, elementwise_affine=affine)
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList(OPTDecoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids, positions, kv_caches, attn_metadata):
        embeds = self.embed_tokens(input_ids)
        if self.project_in is not None:
            embeds = self.project_in(embeds)
        hidden_states = embeds + self.embed_positions(positions + _POSITION_OFFSET)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden_states = layer(hidden_states, kv_cache, attn_metadata)
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        return hidden_states


class OPTModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.decoder = OPTDecoder(config)

    def forward(self, input_ids, positions, kv_caches, attn_metadata):
        return self.decoder(input_ids, positions, kv_caches, attn_metadata)


class OPTForCausalLM(nn.Module):
    """OPT causal LM over the paged KV cache; the LM head is tied to the token embedding."""

    def __init__(self, hf_config):
        super().__init__()
        self.config = hf_config
        self.model = OPTModel(hf_config)
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.word_embed_proj_dim)
        # OPT always ties (HF ties unless tie_word_embeddings is explicitly False).
        self.tied = getattr(hf_config, "tie_word_embeddings", True)
        if self.tied:
            self.lm_head.tie_weights(self.model.decoder.embed_tokens)
        attn = self.model.decoder.layers[0].self_attn
        self.num_layers = hf_config.num_hidden_layers
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, word_embed_proj_dim] of the flattened tokens of this step."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab_size] of the given hidden states, in the model's dtype."""
        return self.lm_head.get_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named weights, with or without the "model." prefix (old hub checkpoints)."""
        stacked = [(".qkv_proj.", ".q_proj.", "q"), (".qkv_proj.", ".k_proj.", "k"),
                   (".qkv_proj.", ".v_proj.", "v")]

        def rename(name: str) -> Optional[str]:
            if name.startswith("decoder."):
                name = "model." + name
            if self.tied and name == "lm_head.weight":
                return None
            return name

        load_named_weights(self, weights, stacked, rename)
