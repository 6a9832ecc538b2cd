"""IBM Granite MoE (GraniteMoeForCausalLM: granite-3.0-1b-a400m, granite-3.0-3b-a800m and their
3.1 versions): Granite's layers and scalars (granite.py) with a mixture of SiLU-gated experts
in place of each MLP, weighted by the softmax of the top-k router logits.

The checkpoints stack every expert in one tensor per projection (input_linear [experts,
2 * intermediate, hidden] holding gate then up, output_linear [experts, hidden, intermediate]);
they are handed to the experts' loader one matrix per expert and projection, as Mixtral's and
Qwen's checkpoints store them, so tensor parallelism slices them the same way.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from aserve.models.granite import GraniteForCausalLM
from aserve.models.layers.moe import CapturableWhenGrouped, MoEBlock


class GraniteMoE(MoEBlock):
    def __init__(self, config, layer_idx: int):
        super().__init__(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                         config.intermediate_size, renormalize=False, float32_weights=False, top_k_first=True)


class GraniteMoeForCausalLM(CapturableWhenGrouped, GraniteForCausalLM):
    make_mlp = staticmethod(GraniteMoE)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(_per_expert(weights))


def _per_expert(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The stacked experts as one matrix per expert and projection, and the router as the
    block's gate, named as Qwen's checkpoints name them."""
    for name, tensor in weights:
        if ".block_sparse_moe." not in name:
            yield name, tensor
            continue
        layer = name[:name.index(".block_sparse_moe.")] + ".mlp"
        if name.endswith(".router.layer.weight"):
            yield f"{layer}.gate.weight", tensor
        elif name.endswith(".input_linear.weight"):
            gate, up = tensor.chunk(2, dim=1)
            for expert in range(tensor.shape[0]):
                yield f"{layer}.experts.{expert}.gate_proj.weight", gate[expert]
                yield f"{layer}.experts.{expert}.up_proj.weight", up[expert]
        elif name.endswith(".output_linear.weight"):
            for expert in range(tensor.shape[0]):
                yield f"{layer}.experts.{expert}.down_proj.weight", tensor[expert]
        else:
            yield name, tensor   # unknown: load_named_weights names it in its error
