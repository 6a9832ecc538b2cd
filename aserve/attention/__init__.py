"""The attention seam: the one place that chooses how attention is computed."""

from __future__ import annotations

import logging

import torch

from aserve.attention.metadata import AttentionMetadata
from aserve.attention.torch_ref import TorchReferenceBackend

__all__ = ["AttentionMetadata", "get_attention_backend"]

logger = logging.getLogger(__name__)


def get_attention_backend(device: torch.device, head_dim: int):
    """CUDA kernels on an NVIDIA GPU where they support the head size; the torch reference
    everywhere else (the CPU, and the oracle the kernels are tested against).
    ASERVE_KERNELS=torch forces the reference on a GPU too (debugging, comparisons)."""
    if device.type != "cuda":
        return TorchReferenceBackend()
    from aserve.cuda.fused import kernels_enabled
    from aserve.cuda.ops import HEAD_SIZES

    if not kernels_enabled():
        return TorchReferenceBackend()
    if head_dim not in HEAD_SIZES:
        logger.warning("head_dim %d has no CUDA decode kernel (supported: %s): using the torch "
                       "reference attention", head_dim, HEAD_SIZES)
        return TorchReferenceBackend()
    from aserve.attention.cuda_backend import CudaAttentionBackend

    return CudaAttentionBackend()
