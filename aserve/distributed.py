"""Tensor-parallel state and collectives used by the model layers.

Layers ask this module for their rank and world size instead of holding them, so one model
file serves TP=1 and TP>1. Until `init_tensor_parallel` is called the process is rank 0 of 1
and the collectives are the identity (no torch.distributed needed).
"""

from __future__ import annotations

from typing import Optional

import torch

_TP_RANK = 0
_TP_WORLD_SIZE = 1
_TP_GROUP = None  # a torch.distributed ProcessGroup; None means the default group


def init_tensor_parallel(rank: int, world_size: int, group: Optional[object] = None) -> None:
    """Record this process's tensor-parallel rank, world size and process group.

    torch.distributed must already be initialised when world_size > 1.
    """
    global _TP_RANK, _TP_WORLD_SIZE, _TP_GROUP
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid tensor parallel rank {rank} for world size {world_size}")
    _TP_RANK, _TP_WORLD_SIZE, _TP_GROUP = rank, world_size, group


def get_tensor_model_parallel_rank() -> int:
    """This process's rank within the tensor-parallel group (0 when not parallel)."""
    return _TP_RANK


def get_tensor_model_parallel_world_size() -> int:
    """The number of tensor-parallel ranks (1 when not parallel)."""
    return _TP_WORLD_SIZE


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the tensor-parallel ranks (identity at world size 1)."""
    if _TP_WORLD_SIZE == 1:
        return x
    import torch.distributed as dist
    dist.all_reduce(x, group=_TP_GROUP)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's x along dim, in rank order (identity at world size 1)."""
    if _TP_WORLD_SIZE == 1:
        return x
    import torch.distributed as dist
    parts = [torch.empty_like(x) for _ in range(_TP_WORLD_SIZE)]
    dist.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=dim)
