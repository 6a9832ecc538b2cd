"""Llama, and the families that share its shape (Mistral here; Qwen2 subclasses it).

Pre-RMSNorm decoder layers with rotary attention (grouped-query) and a SiLU-gated MLP. The
q/k/v and gate/up projections are fused into one matrix each (QKVParallelLinear,
MergedColumnParallelLinear); load_weights maps the HF per-projection names onto them.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from aserve.attention import AttentionMetadata
from aserve.cuda.gemv import gemv_silu_mul
from aserve.models.layers import (Attention, MergedColumnParallelLinear, ParallelLMHead,
                                  QKVParallelLinear, RMSNorm, RotaryEmbedding, RowParallelLinear,
                                  VocabParallelEmbedding, get_rope_parameters, load_named_weights)
from aserve.models.decoder_lm import QKV_GATE_UP_SHARDS
from aserve.models.layers.activation import ActAndMul
from aserve.models.layers.linear import uses_gemv
from aserve.models.layers.moe import Experts, expert_shard
from aserve.models.layers.rotary import rope_position_limit


def layer_sliding_window(config, layer_idx: int) -> Optional[int]:
    """The sliding window of layer layer_idx, or None for full attention.

    transformers >= 5 lists per-layer kinds in `layer_types`; older Qwen2 configs carry
    `use_sliding_window` + `max_window_layers` instead; Mistral just sets `sliding_window`.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if hasattr(config, "use_sliding_window"):
        if not config.use_sliding_window:
            return None
        return window if layer_idx >= getattr(config, "max_window_layers", 0) else None
    return window


class LlamaMLP(nn.Module):
    def __init__(self, config, bias: bool):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias)
        self.act_fn = ActAndMul(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj
        if self.act_fn.is_silu and uses_gemv(x, gate_up.weight):
            # A decode step of a few tokens: SiLU-and-mul in the GEMV's epilogue, one kernel fewer.
            return self.down_proj(gemv_silu_mul(x, gate_up.weight, gate_up.bias))
        return self.down_proj(self.act_fn(gate_up(x)))


class LlamaAttention(nn.Module):
    # False in layers without a position embedding (SmolLM3's every fourth, Cohere 2's full ones).
    uses_rope = True

    def __init__(self, config, layer_idx: int, qkv_bias: bool, o_bias: bool):
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads,
                                          total_kv_heads, bias=qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, bias=o_bias)
        self.rotary_emb = RotaryEmbedding(self.head_dim, rope_position_limit(config, config.max_position_embeddings),
                                          get_rope_parameters(config))
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5,
                              self.num_kv_heads, layer_sliding_window(config, layer_idx))

    def split_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)

    def attend(self, positions, q, k, v, kv_cache, attn_metadata) -> torch.Tensor:
        """o_proj(attention(q, k, v)), q and k rotated first where this layer uses rope."""
        rotary = self.rotary_emb if self.uses_rope else None
        return self.o_proj(self.attn(q, k, v, kv_cache, attn_metadata, rotary, positions))

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        return self.attend(positions, *self.split_qkv(hidden_states), kv_cache, attn_metadata)


def dense_mlp(config, layer_idx: int) -> nn.Module:
    return LlamaMLP(config, bias=getattr(config, "mlp_bias", False))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, qkv_bias: bool, o_bias: bool,
                 attention_class: type = LlamaAttention, make_mlp: Callable = dense_mlp):
        super().__init__()
        self.self_attn = attention_class(config, layer_idx, qkv_bias, o_bias)
        self.mlp = make_mlp(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def normed_input(self, hidden_states, residual):
        """(input_layernorm(the residual stream), the residual stream): the previous layer's
        residual add fused with this norm (residual None: the first layer, whose input is the
        residual stream itself)."""
        if residual is None:
            return self.input_layernorm(hidden_states), hidden_states
        return self.input_layernorm(hidden_states, residual)

    def forward(self, positions, hidden_states, residual, kv_cache, attn_metadata):
        """(hidden_states, residual) in and out: each residual add is fused with the norm after
        it."""
        hidden_states, residual = self.normed_input(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, kv_cache, attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool, attention_class: type = LlamaAttention,
                 make_mlp: Callable = dense_mlp, layer_class: type = LlamaDecoderLayer):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_class(config, i, qkv_bias, o_bias, attention_class, make_mlp)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embedding_multiplier: Optional[float] = None   # Granite scales its embeddings

    def forward(self, input_ids, positions, kv_caches, attn_metadata):
        hidden_states = self.embed_tokens(input_ids)
        if self.embedding_multiplier is not None:
            hidden_states = hidden_states * self.embedding_multiplier
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden_states, residual = layer(positions, hidden_states, residual, kv_cache, attn_metadata)
        if residual is None:  # a model without layers
            return self.norm(hidden_states)
        return self.norm(hidden_states, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Llama-architecture causal LM over the paged KV cache (also serves MistralForCausalLM)."""

    # Subclasses for Llama-shaped families override how their biases are configured, the
    # attention module (Qwen3 normalises q and k per head) and each layer's MLP (mixtures of
    # experts: Mixtral, Qwen-MoE).
    attention_class: type = LlamaAttention
    make_mlp: Callable = staticmethod(dense_mlp)
    decoder_layer_class: type = LlamaDecoderLayer
    # Checkpoint projections loaded as shards of the fused layers (an MLP without a gate keeps
    # its up_proj: QKV_SHARDS).
    stacked_shards: list = QKV_GATE_UP_SHARDS

    @staticmethod
    def _biases(config) -> tuple[bool, bool]:
        bias = getattr(config, "attention_bias", False)
        return bias, bias

    def __init__(self, hf_config):
        super().__init__()
        self.config = hf_config
        qkv_bias, o_bias = self._biases(hf_config)
        self.model = LlamaModel(hf_config, qkv_bias, o_bias, self.attention_class, self.make_mlp,
                                self.decoder_layer_class)
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size)
        if getattr(hf_config, "tie_word_embeddings", False):
            self.lm_head.tie_weights(self.model.embed_tokens)
        attn = self.model.layers[0].self_attn
        self.num_layers = hf_config.num_hidden_layers
        self.num_kv_heads = attn.num_kv_heads  # per tensor-parallel rank
        self.head_dim = attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] of the flattened tokens of this step."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab_size] of the given hidden states, in the model's dtype."""
        return self.lm_head.get_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named weights (q/k/v and gate/up are fused on the way)."""
        tied = getattr(self.config, "tie_word_embeddings", False)

        def rename(name: str) -> Optional[str]:
            if "rotary_emb.inv_freq" in name or "rotary_emb.cos_cached" in name \
                    or "rotary_emb.sin_cached" in name:
                return None  # buffers some checkpoints saved; recomputed here
            if tied and name == "lm_head.weight":
                return None  # same tensor as the embedding, which is loaded under its own name
            return self.checkpoint_name(name)

        # One matrix per expert and projection goes into the experts' stacked parameters.
        load_named_weights(self, weights, self.stacked_shards, rename, route=expert_shard)
        for module in self.modules():
            if isinstance(module, Experts):
                module.check_loaded()

    @staticmethod
    def checkpoint_name(name: str) -> str:
        """A checkpoint name as this module tree names it (Mixtral's MLP has its own name)."""
        return name


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama with a sliding attention window taken from the config."""
