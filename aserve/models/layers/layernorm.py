"""Normalisation layers, numerically identical to the Hugging Face ones."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from aserve.cuda import fused
from aserve.distributed import current_group
from aserve.models.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalised in float32, cast back, then scaled (as HF LlamaRMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """norm(x); or, given the residual stream, (norm(residual + x), residual + x): the
        decoder layer's residual add fused with the norm that follows it."""
        if fused.usable(x):  # one kernel instead of eight
            if residual is None:
                return fused.rms_norm(x, self.weight, self.variance_epsilon)
            return fused.rms_norm(x, self.weight, self.variance_epsilon, residual), residual
        if residual is None:
            return self._norm(x)
        residual = residual + x
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # The scale multiplies after the cast back, in the input dtype, exactly like HF; doing
        # it in float32 would be more precise but would drift from the reference in bf16.
        input_dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * h.to(input_dtype)


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm whose parameters carry a weight_loader like every other layer; on a
    GPU it runs aserve's kernel (fused.layer_norm), which overlaps its neighbours in a decode
    step's chain of kernels where torch's does not."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True):
        super().__init__(hidden_size, eps=eps, elementwise_affine=elementwise_affine, bias=bias)
        for p in self.parameters():
            p.requires_grad_(False)
            p.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) == 1 and fused.usable(x):
            return fused.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class PerHeadLayerNorm(nn.Module):
    """A bias-free LayerNorm over each head of x [T, heads * head_dim], with one weight row per
    head (Cohere's and StableLM's q/k norms), computed in float32 as transformers does. Each
    tensor-parallel rank holds the rows of its heads: `replicas` ranks share each head (KV heads
    replicated over more ranks than there are of them). A checkpoint stores the rows as one
    [heads, head_dim] tensor (Cohere), or one tensor a head (StableLM: shard_id is the head)."""

    def __init__(self, num_heads: int, head_dim: int, eps: float, replicas: int = 1):
        super().__init__()
        group = current_group()
        self.first_head = group.rank // replicas * num_heads
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim), requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Optional[int] = None) -> None:
        if shard_id is None:
            param.data.copy_(loaded.narrow(0, self.first_head, param.shape[0]))
        elif self.first_head <= shard_id < self.first_head + param.shape[0]:   # another rank's head: skipped
            param.data[shard_id - self.first_head].copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = x.reshape(x.shape[0], *self.weight.shape).float()
        mean = heads.mean(-1, keepdim=True)
        variance = (heads - mean).pow(2).mean(-1, keepdim=True)
        normed = self.weight.float() * ((heads - mean) * torch.rsqrt(variance + self.eps))
        return normed.to(x.dtype).reshape(x.shape[0], -1)
