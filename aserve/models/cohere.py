"""Cohere (CohereForCausalLM: Command-R, Command-R+, Aya) and Cohere 2 (Cohere2ForCausalLM:
Command-R7B, Command-A).

Each layer runs attention and a SiLU-gated MLP side by side on one bias-free LayerNorm of its
input and adds both to it; the logits are scaled by logit_scale. Command-R+ normalises each
head of q and k with its own LayerNorm weights (use_qk_norm). Cohere 2 alternates sliding-window
layers, which are rotary, with full-attention layers, which have no position embedding at all.

Cohere's rotary embedding rotates interleaved pairs (dimensions 2i and 2i+1) where aserve's
kernels rotate halves (i and i + d/2): q's and k's rows (and their biases and norm weights) are
reordered on load (rotary.interleaved_pairs_to_halves), which leaves q.k and so the scores
exactly Cohere's.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from aserve.models.decoder_lm import DecoderOnlyLM
from aserve.models.head_normed_attention import HeadNormedAttention
from aserve.models.layers import LayerNorm
from aserve.models.layers.rotary import interleaved_pairs_to_halves
from aserve.models.llama import LlamaMLP


class CohereAttention(HeadNormedAttention):
    def __init__(self, config, layer_idx: int):
        bias = getattr(config, "attention_bias", False)
        super().__init__(config, layer_idx, bias, bias, bool(getattr(config, "use_qk_norm", False)))
        layer_types = getattr(config, "layer_types", None)
        # Cohere 2's full-attention layers take no position embedding (transformers rotates only
        # where a layer slides).
        self.uses_rope = layer_types is None or layer_types[layer_idx] == "sliding_attention"


class CohereDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = CohereAttention(config, layer_idx)
        self.mlp = LlamaMLP(config, bias=False)
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=False)

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        normed = self.input_layernorm(hidden_states)
        # transformers' order of the two adds, so the roundings match.
        return hidden_states + self.self_attn(positions, normed, kv_cache, attn_metadata) + self.mlp(normed)


class CohereForCausalLM(DecoderOnlyLM):
    def make_layer(self, config, index: int) -> nn.Module:
        return CohereDecoderLayer(config, index)

    def make_norm(self, config) -> nn.Module:
        return LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=False)

    def tie_embeddings(self, config) -> bool:
        return bool(getattr(config, "tie_word_embeddings", True))   # the checkpoints tie

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.get_logits(hidden_states) * self.config.logit_scale

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        head_dim = self.layers[0].self_attn.head_dim
        super().load_weights(interleaved_pairs_to_halves(weights, head_dim, head_dim))


class Cohere2ForCausalLM(CohereForCausalLM):
    """Cohere 2: the same layers; sliding and full attention alternate (CohereAttention)."""
