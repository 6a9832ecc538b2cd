"""The attention seam: the one place that chooses how attention is computed."""

from __future__ import annotations

import torch

from aserve.attention.metadata import AttentionMetadata
from aserve.attention.torch_ref import TorchReferenceBackend

__all__ = ["AttentionMetadata", "get_attention_backend"]


def get_attention_backend(device: torch.device):
    """The backend for a device. CUDA kernels join here; until then every device uses torch."""
    return TorchReferenceBackend()
