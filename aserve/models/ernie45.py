"""ERNIE 4.5 dense (Ernie4_5ForCausalLM: baidu's ERNIE-4.5-0.3B): Llama's layers with a bias on
every projection where use_bias says so, tied embeddings, and a rotary embedding over
interleaved pairs, whose q/k rows are reordered on load (rotary.interleaved_pairs_to_halves)."""

from __future__ import annotations

from typing import Iterable

import torch

from aserve.models.layers.rotary import interleaved_pairs_to_halves
from aserve.models.llama import LlamaForCausalLM, LlamaMLP


def _mlp(config, layer_idx: int) -> LlamaMLP:
    return LlamaMLP(config, bias=bool(getattr(config, "use_bias", False)))


class Ernie4_5ForCausalLM(LlamaForCausalLM):
    make_mlp = staticmethod(_mlp)

    @staticmethod
    def _biases(config) -> tuple[bool, bool]:
        bias = bool(getattr(config, "use_bias", False))
        return bias, bias

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        rotary = self.model.layers[0].self_attn.rotary_emb
        super().load_weights(interleaved_pairs_to_halves(weights, rotary.head_dim, rotary.rotary_dim))
