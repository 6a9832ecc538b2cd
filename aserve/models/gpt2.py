"""GPT-2: learned absolute positions, pre-LayerNorm blocks, gelu_new MLP, tied LM head; and
GPT-BigCode (StarCoder 1, SantaCoder, WizardCoder, OctoCoder), the same blocks with one shared
key/value head (multi-query attention) and nn.Linear weights.

HF stores GPT-2's projections as Conv1D, whose weights are [in, out]; they are transposed to
the [out, in] layout of our linear layers while loading, and the fused c_attn splits into q/k/v.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from aserve.attention import AttentionMetadata
from aserve.models.layers import (Attention, ColumnParallelLinear, LayerNorm, ParallelLMHead,
                                  QKVParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                  get_act_fn, load_named_weights)
from aserve.models.layers.linear import fused_linear

_CONV1D_WEIGHTS = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


class GPT2Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        hidden, total_heads = config.hidden_size, config.num_attention_heads
        self.head_dim = hidden // total_heads
        total_kv_heads = 1 if getattr(config, "multi_query", False) else total_heads   # GPT-BigCode's MQA
        self.c_attn = QKVParallelLinear(hidden, self.head_dim, total_heads, total_kv_heads, bias=True)
        self.num_heads, self.num_kv_heads = self.c_attn.num_heads, self.c_attn.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True)
        # The same scale HF's GPT2Attention computes from its two config switches.
        scale = self.head_dim ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_idx + 1)
        self.attn = Attention(self.num_heads, self.head_dim, scale, self.num_kv_heads)

    def forward(self, hidden_states, kv_cache, attn_metadata, residual):
        """residual + attention(hidden_states); in a decode step the residual add runs in the
        output GEMV's epilogue (a kernel fewer, the same bits)."""
        q, k, v = self.c_attn(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        attn = self.attn(q, k, v, kv_cache, attn_metadata)
        out = fused_linear(attn, self.c_proj, residual=residual)
        return out if out is not None else residual + self.c_proj(attn)


class GPT2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = getattr(config, "n_inner", None) or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, inner, bias=True)
        self.c_proj = RowParallelLinear(inner, config.hidden_size, bias=True)
        self.act = get_act_fn(config.activation_function)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + MLP(x), the residual add folded as in GPT2Attention."""
        up = self.act(self.c_fc(x))
        out = fused_linear(up, self.c_proj, residual=residual)
        return out if out is not None else residual + self.c_proj(up)


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.hidden_size, eps=eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = LayerNorm(config.hidden_size, eps=eps)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden_states, kv_cache, attn_metadata):
        hidden_states = self.attn(self.ln_1(hidden_states), kv_cache, attn_metadata, residual=hidden_states)
        return self.mlp(self.ln_2(hidden_states), residual=hidden_states)


class GPT2Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = VocabParallelEmbedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids, positions, kv_caches, attn_metadata):
        hidden_states = self.wte(input_ids) + self.wpe(positions)
        for block, kv_cache in zip(self.h, kv_caches):
            hidden_states = block(hidden_states, kv_cache, attn_metadata)
        return self.ln_f(hidden_states)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 causal LM over the paged KV cache; the LM head is tied to wte."""

    def __init__(self, hf_config):
        super().__init__()
        self.config = hf_config
        self.transformer = GPT2Model(hf_config)
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size)
        self.tied = getattr(hf_config, "tie_word_embeddings", True)
        if self.tied:
            self.lm_head.tie_weights(self.transformer.wte)
        attn = self.transformer.h[0].attn
        self.num_layers = hf_config.num_hidden_layers
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] of the flattened tokens of this step."""
        return self.transformer(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab_size] of the given hidden states, in the model's dtype."""
        return self.lm_head.get_logits(hidden_states)

    # Checkpoint weights stored as Conv1D ([in, out]), transposed on load.
    conv1d_weights: tuple[str, ...] = _CONV1D_WEIGHTS

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named weights, with or without the "transformer." prefix."""
        def transposed(items):
            for name, tensor in self.checkpoint_tensors(items):
                yield name, tensor.t() if self.conv1d_weights and name.endswith(self.conv1d_weights) else tensor

        def rename(name: str) -> Optional[str]:
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                return None  # causal-mask buffers that old checkpoints saved
            if name == "lm_head.weight":
                return None if self.tied else name
            return name if name.startswith("transformer.") else "transformer." + name

        load_named_weights(self, transposed(weights), (), rename)

    def checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors in GPT-2's layout (GPT-BigCode reorders one)."""
        return weights


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    """GPT-BigCode: nn.Linear weights (no transposes). Its checkpoints with multi_query=False
    keep each head's q, k and v rows together in c_attn; they are reordered into q, k, v."""

    conv1d_weights = ()

    def checkpoint_tensors(self, weights):
        if getattr(self.config, "multi_query", False):
            yield from weights
            return
        heads = self.config.num_attention_heads
        for name, tensor in weights:
            if name.endswith((".c_attn.weight", ".c_attn.bias")):
                tensor = tensor.reshape(heads, 3, -1, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)
            yield name, tensor
