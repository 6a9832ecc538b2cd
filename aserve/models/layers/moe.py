"""A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Granite MoE): a router picks each token's top-k
experts, each a SiLU-gated MLP, and the token's output is their outputs weighted by the
router's probabilities.

Every expert is split over the tensor-parallel ranks like a dense MLP: each rank holds a slice
of every expert's intermediate size (gate and up rows, down columns), computes its partial
outputs, and the ranks' sums are all-reduced once for the whole layer.

The experts' weights are two stacked tensors ([experts, 2 * intermediate, hidden] and
[experts, hidden, intermediate]); checkpoints store one matrix per expert and projection,
which load_weights routes here through expert_shard().

Computation: the tokens are grouped by expert (one sort and one count read back to the host),
then each expert that has tokens runs as two dense matmuls over its group, in expert order,
as transformers' loop does, so float32 outputs match it exactly. The count read makes a step
wait for the GPU, so models with this layer run without decode CUDA graphs.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from aserve.distributed import current_group
from aserve.models.layers.linear import ReplicatedLinear, divide

# Checkpoint names of one expert's matrices: Qwen's (gate/up/down_proj) and Mixtral's (w1/w3/w2).
_EXPERT_NAME = re.compile(r"^(?P<layer>.*\.experts)\.(?P<expert>\d+)\."
                          r"(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_PROJECTION = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def expert_shard(name: str) -> Optional[tuple[str, tuple[int, str]]]:
    """(the stacked parameter, (expert, "gate" | "up" | "down")) of one expert's checkpoint
    matrix, e.g. "model.layers.3.mlp.experts.7.up_proj.weight" -> ("model.layers.3.mlp.experts
    .w13", (7, "up")); None for any other name."""
    match = _EXPERT_NAME.match(name)
    if match is None:
        return None
    kind = _PROJECTION[match["proj"]]
    return f"{match['layer']}.{'w2' if kind == 'down' else 'w13'}", (int(match["expert"]), kind)


class Experts(nn.Module):
    """The experts' stacked weights, this rank's slice of each."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.tp = current_group()
        self.num_experts = num_experts
        self.shard = divide(intermediate_size, self.tp.world_size, "the experts' intermediate size")
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.shard, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.shard), requires_grad=False)
        self.w13.weight_loader = self.w2.weight_loader = self.weight_loader
        self._loaded: set[tuple[int, str]] = set()

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, str]) -> None:
        expert, kind = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"the checkpoint has expert {expert}; the config says {self.num_experts}")
        start = self.tp.rank * self.shard
        if kind == "down":
            source, target = loaded.narrow(1, start, self.shard), param.data[expert]
        else:
            source = loaded.narrow(0, start, self.shard)
            target = param.data[expert].narrow(0, 0 if kind == "gate" else self.shard, self.shard)
        if source.shape != target.shape:
            raise ValueError(f"shape mismatch for expert {expert} {kind}: parameter {tuple(target.shape)}, "
                             f"checkpoint slice {tuple(source.shape)}")
        target.copy_(source)
        self._loaded.add(shard_id)

    def check_loaded(self) -> None:
        """Every expert's three matrices came from the checkpoint (load_named_weights sees the
        stacked parameters only)."""
        missing = [(e, k) for e in range(self.num_experts) for k in ("gate", "up", "down")
                   if (e, k) not in self._loaded]
        if missing:
            raise ValueError(f"checkpoint lacks expert weights {missing[:8]}{' ...' if len(missing) > 8 else ''}")

    def forward(self, x: torch.Tensor, top_ids: torch.Tensor, top_weights: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum over each token's experts of weight * expert(x)."""
        out = torch.zeros_like(x)
        flat = top_ids.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of = order // top_ids.shape[1]
        weight_of = top_weights.flatten()[order]
        start = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            tokens, weights = token_of[start:start + count], weight_of[start:start + count]
            start += count
            gate, up = F.linear(x[tokens], self.w13[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[expert]) * weights[:, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


class MoEBlock(nn.Module):
    """Router and experts. renormalize: the top-k probabilities are scaled to sum to 1 (Mixtral
    always; Qwen where the config's norm_topk_prob says so). float32_weights: the probabilities
    multiply the experts' outputs in float32 (Mixtral's transformers code), else in the model's
    dtype (Qwen's). top_k_first: the weights are the softmax of the top-k logits alone
    (Granite's; the same as renormalising, up to rounding)."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, float32_weights: bool, top_k_first: bool = False):
        super().__init__()
        self.top_k, self.renormalize, self.float32_weights = top_k, renormalize, float32_weights
        self.top_k_first = top_k_first
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden_size, intermediate_size)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(each token's top-k experts, their weights)."""
        logits = self.gate(x)
        if self.top_k_first:
            top_logits, top_ids = torch.topk(logits.float(), self.top_k, dim=-1)
            top_weights = torch.softmax(top_logits, dim=-1)
            return top_ids, top_weights if self.float32_weights else top_weights.to(x.dtype)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_weights, top_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            top_weights /= top_weights.sum(dim=-1, keepdim=True)
        return top_ids, top_weights if self.float32_weights else top_weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The experts' output, summed over the tensor-parallel ranks (each holds a slice of
        every expert)."""
        top_ids, top_weights = self.route(x)
        out = self.experts(x, top_ids, top_weights)
        return self.experts.tp.all_reduce(out) if self.experts.tp.world_size > 1 else out
