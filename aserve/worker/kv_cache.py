"""KV cache sizing and allocation: how many blocks fit the memory budget, and the tensors."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

_DEFAULT_CPU_KV_CACHE_GB = 1.0


def bytes_per_block(model, block_size: int, dtype: torch.dtype) -> int:
    """Keys and values of block_size tokens across every layer."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * block_size * model.num_kv_heads * model.head_dim * element * model.num_layers


def num_blocks_for_budget(model, block_size: int, dtype: torch.dtype, device: torch.device,
                          kv_cache_memory_gb, gpu_memory_utilization: float,
                          profile_forward=None) -> int:
    """Blocks that fit: on CPU a fixed budget; on GPU what is left under gpu_memory_utilization
    after the weights and the peak activations of the largest step (profile_forward runs it)."""
    per_block = bytes_per_block(model, block_size, dtype)
    if device.type != "cuda":
        budget = (kv_cache_memory_gb or _DEFAULT_CPU_KV_CACHE_GB) * (1 << 30)
        return int(budget // per_block)
    if kv_cache_memory_gb is not None:
        return int(kv_cache_memory_gb * (1 << 30) // per_block)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    scratch_cache = profile_forward() if profile_forward is not None else 0
    torch.cuda.synchronize(device)
    # What a step needs beyond what is allocated now (activations come and go each step), less
    # the profile's own throwaway KV cache, in place of which the real one is counted.
    activation_peak = (torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
                       - scratch_cache)
    free, total = torch.cuda.mem_get_info(device)
    # Everything on the card now counts against this engine's share, our weights and any
    # other process's or engine's memory alike, as vLLM's gpu_memory_utilization does.
    in_use = total - free
    budget = gpu_memory_utilization * total - in_use - activation_peak
    if budget < per_block:
        raise RuntimeError(
            f"no memory is left for the KV cache: {in_use / (1 << 30):.2f} GiB of the card's "
            f"{total / (1 << 30):.2f} GiB are in use (this model's weights and anything else on it) "
            f"and a step needs {activation_peak / (1 << 30):.2f} GiB more, against "
            f"gpu_memory_utilization={gpu_memory_utilization}; raise gpu_memory_utilization, free the "
            f"card, or set kv_cache_memory_gb.")
    logger.info("KV cache budget %.2f GiB (%.2f GiB in use, %.2f GiB step activations)",
                budget / (1 << 30), in_use / (1 << 30), activation_peak / (1 << 30))
    return int(budget // per_block)


def allocate_kv_caches(model, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> list[torch.Tensor]:
    """One [2, num_blocks, block_size, kv_heads, head_dim] tensor per layer.

    torch.empty: slots are always written before they are read, and untouched CPU pages
    are then never committed, so a generous CPU budget costs nothing until used.
    """
    shape = (2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
    return [torch.empty(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]


def copy_blocks(kv_caches: list[torch.Tensor], copies: list[tuple[int, int]]) -> None:
    """Copy-on-write: duplicate shared blocks before a sequence writes into its own copy."""
    if not copies:
        return
    device = kv_caches[0].device
    if device.type == "cuda":
        from aserve.cuda import ops
        from aserve.cuda.host_copy import to_device

        ops.copy_blocks(kv_caches, to_device(copies, torch.long, device))
        return
    copy_blocks_reference(kv_caches, copies)


def copy_blocks_reference(kv_caches: list[torch.Tensor], copies: list[tuple[int, int]]) -> None:
    """copy_blocks in plain torch ops: the CPU path and the CUDA kernel's oracle."""
    device = kv_caches[0].device
    src = torch.tensor([s for s, _ in copies], dtype=torch.long, device=device)
    dst = torch.tensor([d for _, d in copies], dtype=torch.long, device=device)
    for cache in kv_caches:
        cache[:, dst] = cache[:, src]
