"""Activation functions by their Hugging Face config name (hidden_act / activation_function)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aserve.cuda import fused


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-approximated GELU, written as HF's NewGELUActivation so results are equal bit
    for bit (F.gelu(approximate="tanh") rounds slightly differently)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "gelu_fast": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: torch.square(F.relu(x)),   # Arcee's (and Nemotron's) squared ReLU
}


def get_act_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation named `name` in a HF config; ValueError listing the known ones otherwise."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}") from None


class SiluAndMul(nn.Module):
    """silu(x[..., :d]) * x[..., d:] for the fused gate_up projection of width 2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class ActAndMul(nn.Module):
    """act(x[..., :d]) * x[..., d:] for a gated MLP with any activation (hidden_act)."""

    def __init__(self, name: str):
        super().__init__()
        self.act = get_act_fn(name)
        self.is_silu = self.act is F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_silu and fused.usable(x):
            return fused.silu_and_mul(x)
        d = x.shape[-1] // 2
        return self.act(x[..., :d]) * x[..., d:]
