"""A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Granite MoE): a router picks
each token's top-k experts, each a SiLU-gated MLP, and the token's output is their outputs
weighted by the router's probabilities.

Every expert is split over the tensor-parallel ranks like a dense MLP: each rank holds a slice
of every expert's intermediate size (gate and up rows, down columns), computes its partial
outputs, and the ranks' sums are all-reduced once for the whole layer.

The experts' weights are two stacked tensors ([experts, 2 * intermediate, hidden] and
[experts, hidden, intermediate]); checkpoints store one matrix per expert and projection,
which load_weights routes here through expert_shard().

Computation, two ways:
- by default, the tokens are grouped by expert (one sort and one count read back to the host),
  then each expert that has tokens runs as two dense matmuls over its group, in expert order,
  as transformers' loop does, so float32 outputs match it exactly. The count read makes a step
  wait for the GPU, so models with this layer run without decode CUDA graphs.
- with ASERVE_MOE_GROUPED_MM=1, the sorted rows go through torch._grouped_mm, the
  group boundaries found on the device (searchsorted), so nothing is read back: two launches a
  layer whatever the number of experts, and the decode steps can be captured in CUDA graphs. A
  token's k outputs are summed in its top-k order, not in expert order, so float32 results
  differ from transformers' in the last bits. Off by default until a card has checked and
  measured it (bench/workloads.py's M and M1, Qwen3-30B-A3B's shape).
  On a GPU, torch has a grouped kernel of its own only for bfloat16 on compute capability 9.x
  and 10.x, with every row 16-byte aligned; elsewhere it falls back to a loop that reads the
  group boundaries to the host, which no CUDA graph can hold (found on an H200 in float32).
  There the experts take the default path instead (native_grouped_mm()).
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from aserve.cuda.compiler import env_switch
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


GROUPED_MM_ENV = "ASERVE_MOE_GROUPED_MM"


def grouped_mm_wanted() -> bool:
    """Whether experts take the grouped path (see the module's docstring); torch runs it on the
    CPU too, where the tests hold it to the loop."""
    return env_switch(GROUPED_MM_ENV, "0") and hasattr(torch, "_grouped_mm")


def native_grouped_mm(weight: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs its own kernel on this weight's device and dtype: on the
    CPU always (tests), on a GPU only for bfloat16 on capability 9.x or 10.x with rows of a
    multiple of 8 elements. Its fallback reads `offs` to the host (no graph capture)."""
    if weight.device.type != "cuda":
        return True
    major, _ = torch.cuda.get_device_capability(weight.device)
    return (weight.dtype == torch.bfloat16 and major in (9, 10)
            and all(size % 8 == 0 for size in weight.shape[1:]))


class Experts(nn.Module):
    """The experts' stacked weights, this rank's slice of each. grouped: the grouped-matmul path
    (default: grouped_mm_wanted())."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 grouped: Optional[bool] = None):
        super().__init__()
        self.grouped = grouped_mm_wanted() if grouped is None else grouped
        self.tp = current_group()
        self.num_experts = num_experts
        self.shard = divide(intermediate_size, self.tp.world_size, "the experts' intermediate size")
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.shard, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.shard), requires_grad=False)
        self.w13.weight_loader = self.w2.weight_loader = self.weight_loader
        self._loaded: set[tuple[int, str]] = set()
        self._native_for: Optional[tuple[torch.device, torch.dtype]] = None   # takes_grouped_path's cache
        self._native = False

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

    @property
    def takes_grouped_path(self) -> bool:
        """Grouped where asked for and torch runs it natively here (native_grouped_mm); found
        once per placement of the weights, not at every layer's call."""
        if not self.grouped:
            return False
        placement = (self.w13.device, self.w13.dtype)
        if self._native_for != placement:
            self._native_for = placement
            self._native = native_grouped_mm(self.w13) and native_grouped_mm(self.w2)
        return self._native

    def forward(self, x: torch.Tensor, top_ids: torch.Tensor, top_weights: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum over each token's experts of weight * expert(x)."""
        if self.takes_grouped_path:
            return self._grouped_forward(x, top_ids, top_weights)
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

    def _grouped_forward(self, x: torch.Tensor, top_ids: torch.Tensor, top_weights: torch.Tensor) -> torch.Tensor:
        """The same sum with no value read back to the host: the (token, choice) rows sorted by
        expert, two grouped matmuls over the experts' groups, and each token's k outputs summed
        in a fixed order (no atomics)."""
        num_tokens, k = top_ids.shape
        flat = top_ids.flatten()
        order = torch.argsort(flat, stable=True)
        experts = torch.arange(self.num_experts, device=x.device, dtype=flat.dtype)
        ends = torch.searchsorted(flat[order], experts, right=True).to(torch.int32)   # each group's end row
        gate, up = torch._grouped_mm(x[order // k], self.w13.transpose(-2, -1), offs=ends).chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, self.w2.transpose(-2, -1), offs=ends)
        by_choice = torch.empty_like(y)
        by_choice[order] = y                                 # back to (token, choice) order
        # Weighted in the weights' dtype, as the loop weights each expert's rows.
        by_choice = by_choice.view(num_tokens, k, -1) * top_weights[..., None]
        return by_choice.sum(dim=1).to(x.dtype)


class CapturableWhenGrouped:
    """For a model with Experts layers: its decode steps can be captured in CUDA graphs only
    where every one takes the grouped path (the default one reads counts back to the host)."""

    @property
    def supports_decode_graphs(self) -> bool:
        return all(m.takes_grouped_path for m in self.modules() if isinstance(m, Experts))


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
