"""What the decoder-only families written outside Llama's module tree share (Gemma, OLMo 2,
StarCoder2, GPT-NeoX, Phi, Cohere): the embedding, a stack of layers each taking (positions,
hidden, kv cache, metadata), a final norm, and an LM head tied to the embedding where the
config says; their checkpoints' per-projection names fused into q/k/v and gate/up."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from aserve.attention import AttentionMetadata
from aserve.models.layers import ParallelLMHead, VocabParallelEmbedding, load_named_weights

# Checkpoint q/k/v and gate/up projections, loaded as shards of the fused layers.
QKV_SHARDS = [(".qkv_proj.", ".q_proj.", "q"), (".qkv_proj.", ".k_proj.", "k"), (".qkv_proj.", ".v_proj.", "v")]
QKV_GATE_UP_SHARDS = QKV_SHARDS + [(".gate_up_proj.", ".gate_proj.", 0), (".gate_up_proj.", ".up_proj.", 1)]


class DecoderOnlyLM(nn.Module):
    """Subclasses give make_layer(config, index), make_norm(config) and tie_embeddings(config),
    may give the LM head a bias (lm_head_bias), and may scale the embeddings (embed) or the
    logits (compute_logits)."""

    def __init__(self, hf_config):
        super().__init__()
        self.config = hf_config
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        self.layers = nn.ModuleList(self.make_layer(hf_config, i) for i in range(hf_config.num_hidden_layers))
        self.norm = self.make_norm(hf_config)
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, bias=self.lm_head_bias(hf_config))
        self.tied = self.tie_embeddings(hf_config)
        if self.tied:
            self.lm_head.tie_weights(self.embed_tokens)
        attn = self.layers[0].self_attn
        self.num_layers = hf_config.num_hidden_layers
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim

    def make_layer(self, config, index: int) -> nn.Module:
        raise NotImplementedError

    def make_norm(self, config) -> nn.Module:
        raise NotImplementedError

    def tie_embeddings(self, config) -> bool:
        return bool(getattr(config, "tie_word_embeddings", False))

    def lm_head_bias(self, config) -> bool:
        return False

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states = self.embed(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden_states = layer(positions, hidden_states, kv_cache, attn_metadata)
        return self.norm(hidden_states)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.get_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def rename(name: str) -> Optional[str]:
            if (self.tied and name == "lm_head.weight") or "rotary_emb.inv_freq" in name:
                return None   # the embedding's own tensor; a buffer recomputed here
            return name[len("model."):] if name.startswith("model.") else name

        load_named_weights(self, weights, QKV_GATE_UP_SHARDS, rename)
