"""Torch-facing wrappers of aserve's CUDA kernels: shapes and strides checked, the right build
of each kernel picked, launched on torch's current stream (so CUDA graphs capture them).

Each op has a torch reference with the same meaning in aserve/attention/torch_ref.py (or
aserve/worker/kv_cache.py for copy_blocks); tests/test_cuda_kernels.py compares them.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from aserve.cuda.compiler import (FLOAT, INT, INT64, KERNEL_DTYPES, POINTER, current_stream,
                                  device_index, load_module)

# Context tokens one decode CTA covers (a launch argument): small partitions split a short
# batch's contexts over more CTAs to fill the GPU; large ones avoid partial outputs for big
# batches. The kernel holds at most MAX_PARTITION tokens' block ids and MAX_SPLITS splits.
MIN_PARTITION = 128
MAX_PARTITION = 1024
# CTAs per multiprocessor the split count aims for: 16 was the fastest of 2, 4, 8, 16 and 32 in
# one H100 sweep (bench/kernels.py --sweep, bench/RESULTS.md); runs moved ~15% between
# machines, so this is a lead to re-measure, not a proven optimum.
_CTAS_PER_SM = 16
# Query heads one CTA serves from the same KV head: more means fewer re-reads of K/V under
# multi-query attention, but more registers (8 keeps every build free of spills).
MAX_GROUP = 8
MAX_SPLITS = 1024
_NUM_THREADS = 128
HEAD_SIZES = (64, 80, 96, 128, 256)


def decode_group_size(num_heads: int, num_kv_heads: int) -> int:
    """Query heads per CTA: the largest divisor of the heads per KV head that is <= MAX_GROUP."""
    q_per_kv = num_heads // num_kv_heads
    return max(g for g in range(1, min(q_per_kv, MAX_GROUP) + 1) if q_per_kv % g == 0)


def paged_attention_options(dtype: torch.dtype, head_dim: int, block_size: int, group: int) -> list[str]:
    """The -D options of one build of paged_attention.cu."""
    return [f"-DDTYPE={KERNEL_DTYPES[dtype]}", f"-DHEAD_DIM={head_dim}", f"-DBLOCK_SIZE={block_size}",
            f"-DGROUP={group}"]


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_partition(num_seqs: int, ctas_per_seq: int, max_seq_len: int, block_size: int,
                     num_sms: int) -> tuple[int, int]:
    """(partition size, number of splits) for a decode launch: enough splits that the grid
    fills the GPU a few CTAs deep, in partitions of whole blocks within the kernel's limits."""
    wanted_splits = max(1, math.ceil(_CTAS_PER_SM * num_sms / max(1, num_seqs * ctas_per_seq)))
    unit = max(block_size, 32)
    partition = math.ceil(max(1, max_seq_len) / wanted_splits)
    partition = max(partition, math.ceil(max_seq_len / MAX_SPLITS), MIN_PARTITION, block_size)
    partition = min(unit * math.ceil(partition / unit), MAX_PARTITION)
    splits = math.ceil(max(1, max_seq_len) / partition)
    if splits > MAX_SPLITS:
        raise ValueError(f"context of {max_seq_len} tokens exceeds the decode kernel's "
                         f"{MAX_SPLITS * MAX_PARTITION}")
    return partition, splits


def _check_rows(name: str, tensor: torch.Tensor) -> None:
    """Rows (dim 0) may be strided; within a row the elements must be dense and 16-byte aligned."""
    inner = tensor[0] if tensor.shape[0] else tensor
    if tensor.shape[0] and not inner.is_contiguous():
        raise ValueError(f"{name}: each row must be contiguous, got strides {tuple(tensor.stride())}")
    element = tensor.element_size()
    if tensor.data_ptr() % 16 or (tensor.stride(0) * element) % 16:
        raise ValueError(f"{name}: rows must start on 16-byte boundaries")


def paged_decode_attention(out: torch.Tensor, query: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float, max_seq_len: int, sliding_window: Optional[int] = None) -> None:
    """out[i] = softmax(scale * q[i] K_i^T) V_i for one query token per sequence.

    query, out: [N, num_heads, head_dim] (rows may be strided); k_cache, v_cache:
    [num_blocks, block_size, num_kv_heads, head_dim]; block_tables [N, W] int32; seq_lens [N]
    int32 (0 marks a padding row, whose output is left unwritten). max_seq_len must be at least
    every seq_lens[i]: it fixes the number of context splits (grid size), so a CUDA graph
    captured with a larger value stays valid for any shorter context.
    """
    num_seqs, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if head_dim not in HEAD_SIZES:
        raise ValueError(f"head_dim {head_dim} has no decode kernel; supported: {HEAD_SIZES}")
    if query.dtype not in KERNEL_DTYPES or k_cache.dtype != query.dtype or out.dtype != query.dtype:
        raise ValueError(f"query, cache and out must share one of {list(KERNEL_DTYPES)}, got "
                         f"{query.dtype}, {k_cache.dtype}, {out.dtype}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    _check_rows("query", query)
    _check_rows("out", out)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.dtype == torch.int32 and seq_lens.dtype == torch.int32
    assert block_tables.stride(1) == 1 and seq_lens.is_contiguous()
    if num_seqs == 0:
        return
    group = decode_group_size(num_heads, num_kv_heads)
    ctas_per_seq = num_heads // group
    partition, splits = decode_partition(num_seqs, ctas_per_seq, max_seq_len, block_size,
                                         _num_sms(device_index(query)))
    module = load_module("paged_attention.cu", paged_attention_options(query.dtype, head_dim, block_size, group),
                         device_index(query))
    if splits > 1:
        partial_out = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=query.device)
        partial_stats = torch.empty(2, num_seqs, num_heads, splits, dtype=torch.float32, device=query.device)
        partial_ptrs = (partial_out.data_ptr(), partial_stats[0].data_ptr(), partial_stats[1].data_ptr())
    else:
        partial_ptrs = (0, 0, 0)
    stream = current_stream(query)
    module.kernel("paged_decode").launch(
        (ctas_per_seq, num_seqs, splits), (_NUM_THREADS, 1, 1), 0,
        (out.data_ptr(), *partial_ptrs, query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
         block_tables.data_ptr(), seq_lens.data_ptr(), query.stride(0), out.stride(0), block_tables.stride(0),
         num_heads, num_kv_heads, float(scale), splits, partition, int(sliding_window or 0)),
        (POINTER,) * 9 + (INT64, INT64, INT, INT, INT, FLOAT, INT, INT, INT), stream)
    if splits > 1:
        module.kernel("paged_decode_reduce").launch(
            (num_heads, num_seqs, 1), (_NUM_THREADS, 1, 1), 0,
            (out.data_ptr(), *partial_ptrs, seq_lens.data_ptr(), out.stride(0), num_heads, splits, partition),
            (POINTER,) * 5 + (INT64, INT, INT, INT), stream)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k_cache.view(-1, kv_heads, head_dim)[slot_mapping[t]] = key[t] (and values); slots < 0
    are skipped. key/value: [T, kv_heads, head_dim] in the cache's dtype, rows may be strided."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    if key.dtype != k_cache.dtype or value.dtype != v_cache.dtype:
        raise ValueError(f"key/value dtype {key.dtype} must match the cache's {k_cache.dtype}")
    _check_rows("key", key)
    _check_rows("value", value)
    assert slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    element = key.element_size()
    row_bytes = key.shape[1] * key.shape[2] * element
    if row_bytes % 16:
        raise ValueError(f"a token's keys ({row_bytes} bytes) must be a multiple of 16 bytes")
    units = row_bytes // 16
    module = load_module("cache_ops.cu", [], device_index(key))
    module.kernel("reshape_and_cache").launch(
        (num_tokens, 1, 1), (min(256, max(32, units)), 1, 1), 0,
        (key.data_ptr(), value.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
         key.stride(0) * element // 16, value.stride(0) * element // 16, units),
        (POINTER,) * 5 + (INT64, INT64, INT), current_stream(key))


def copy_blocks(kv_caches: list[torch.Tensor], pairs: torch.Tensor) -> None:
    """For every layer's cache [2, num_blocks, ...] and every (src, dst) row of pairs [N, 2]
    int64: cache[:, dst] = cache[:, src]."""
    if pairs.shape[0] == 0 or not kv_caches:
        return
    first = kv_caches[0]
    assert pairs.dtype == torch.int64 and pairs.is_contiguous() and pairs.device == first.device
    num_blocks = first.shape[1]
    block_bytes = first[0, 0].numel() * first.element_size()
    assert block_bytes % 16 == 0 and all(c.is_contiguous() and c.shape == first.shape for c in kv_caches)
    layer_ptrs = torch.tensor([c.data_ptr() for c in kv_caches], dtype=torch.int64).to(first.device)
    module = load_module("cache_ops.cu", [], device_index(first))
    module.kernel("copy_blocks").launch(
        (pairs.shape[0], len(kv_caches), 2), (256, 1, 1), 0,
        (layer_ptrs.data_ptr(), pairs.data_ptr(), num_blocks, block_bytes // 16),
        (POINTER, POINTER, INT64, INT64), current_stream(first))
