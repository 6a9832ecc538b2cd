"""Torch-facing wrappers of aserve's CUDA kernels: shapes and strides checked, the right build
of each kernel picked, launched on torch's current stream (so CUDA graphs capture them).

Each op has a torch reference with the same meaning in aserve/attention/torch_ref.py (or
aserve/worker/kv_cache.py for copy_blocks); tests/test_cuda_kernels.py compares them.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from aserve.cuda.compiler import (FLOAT, INT, INT64, KERNEL_DTYPES, POINTER, capability, current_stream,
                                  device_index, load_module, num_sms, refuse_set_up_during_capture)

# How a decode launch splits contexts over CTAs: grid.z splits per sequence, and each sequence
# divides its own context into at most that many partitions of whole units (the kernel does,
# from the sequence's length), so the split follows real lengths even in a CUDA graph captured
# for longer ones. MIN_PARTITION is the unit (at least a block): 32 tokens is one shared-memory
# tile of the common builds, so a lone sequence's attention takes one memory round trip per
# CTA. One CTA covers at most MAX_PARTITION tokens (the block ids it keeps in shared memory).
MIN_PARTITION = 32
MAX_PARTITION = 8192
# The last split of a sequence combines all of its splits serially; beyond this many splits
# that tail costs more than the extra parallelism gains (a lone 8k context gets 64 splits).
MAX_WANTED_SPLITS = 64
# CTAs per multiprocessor the split count aims for: 8 and 12 were the fastest of 8, 12, 16, 24
# and 32 (timed in CUDA graphs) on an H100 at batch 64 x 2048 and 256 x 640 tokens, 2-9% ahead
# of 16 (bench/decode_attention.py --sweep, bench/RESULTS.md).
_CTAS_PER_SM = 12
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


# Extra -D options of the decode kernel's build (paged_attention.cu: NUM_THREADS, UNROLL,
# MIN_BLOCKS, SMEM_BUDGET, ...; paged_attention_mma.cu: NUM_WARPS, STAGES); bench/decode_attention.py
# --variants sets them to compare builds; empty means the source's defaults.
DECODE_TUNING: dict[str, int] = {}

# Which decode kernel runs: "mma" (tensor cores, paged_attention_mma.cu) where it applies,
# "simt" (CUDA cores, paged_attention.cu) for everything else; "auto" is the default choice
# below. ASERVE_DECODE_KERNEL=simt forces the CUDA-core kernel (to compare the two); "mma"
# asks for tensor cores where they apply.
DECODE_KERNEL_ENV = "ASERVE_DECODE_KERNEL"
DECODE_KERNEL = os.environ.get(DECODE_KERNEL_ENV, "auto")
# What the tensor-core kernel covers: 16-bit types (mma.sync), head sizes whose chunk swizzle
# stays within a row and whose accumulators fit the registers, groups that fit 8 tile rows.
MMA_HEAD_SIZES = (64, 128)
# Where "auto" picks it: groups of at least MMA_MIN_GROUP query heads per KV head, in launches
# of at least MMA_MIN_ROWS query heads per KV head in all (sequences x group). Measured on an
# H200 (bench/decode_attention.py, bench/RESULTS.md 2026-12-03, seventh session; ms, 640-token contexts,
# head size 128, 8 KV heads):
#   group 4: batch 256 0.182 against 0.196 (CUDA cores), 128 0.111 / 0.114, 64 x 2048 tokens
#            0.161 / 0.167, but 32 0.045 / 0.045, 16 0.030 / 0.027, 1 0.012 / 0.011;
#   group 8: batch 256 0.192 / 0.443, 32 0.058 / 0.093;
#   group 2: batch 256 0.196 / 0.183; group 1 (model A, 12 heads of 64): 0.050 / 0.042.
# With few query heads per key the CUDA-core kernel is not issue-bound, and a short batch's
# partitions leave most warps of a 64-token tile idle.
MMA_MIN_GROUP = 4
MMA_MIN_ROWS = 256
_MMA_WARPS, _MMA_STAGES = 4, 2
# The split depth the tensor-core kernel's launches aim for (see _CTAS_PER_SM). Its CTAs hold 64
# KB of stages, 3 per SM, but deeper splits measured slower: 24 took 0.207 ms at batch 256 x 640
# against 0.182 with 12 (one CTA per sequence and head group there), and up to 46% more at
# batches of 8 to 128. 4 warps and 2 stages beat 3 warps, or 3 stages, at every batch.
_MMA_CTAS_PER_SM = 12

# Small launches of the CUDA-core kernel on Hopper and newer run in thread block clusters of up
# to DECODE_CLUSTER CTAs along grid.z, and a sequence whose splits fit one cluster combines them
# through distributed shared memory (decode_common.cuh, CLUSTER_COMBINE); to fit, its partitions
# grow up to CLUSTER_MAX_PARTITION tokens. 16 is the most an H100 or H200 allows (non-portable:
# 8 is the portable limit); the launcher asks the driver how many CTAs of the clustered build
# one cluster may hold on the GPU at hand (Kernel.max_cluster_size). Measured on an H200
# (bench/decode_attention.py, 8 KV heads of 128, one sequence; bench/RESULTS.md 2026-12-03, fourteenth
# session), us without clusters / with 16:
# 128 tokens 10.3 / 6.6, 384 11.6 / 6.8, 640 12.7 / 8.3, 1024 12.2 / 8.3, 2048 17.1 / 11.3,
# 4096 19.7 / 16.9, 8192 24.4 / 27.8; two sequences of 640 13.1 / 11.4. A context longer than one
# cluster covers runs the plain ending slower in a clustered launch (8192 tokens with 128-token
# partitions: 29.0), and 16 x 640 took 44.4 against 26.6 (clusters of 13): so clusters only for
# launches of at most CLUSTER_MAX_GROUPS (sequence, head group) pairs and contexts that one
# cluster covers (decode graphs are captured for 8192 tokens). ASERVE_DECODE_CLUSTER=1 (or 0)
# turns them off.
DECODE_CLUSTER_ENV = "ASERVE_DECODE_CLUSTER"
CLUSTER_MAX_GROUPS = 16
CLUSTER_MAX_PARTITION = 512
DECODE_CLUSTER = os.environ.get(DECODE_CLUSTER_ENV, "16")


_capability = capability   # a module global, so that CPU tests can stand in for a GPU


def decode_kernel_source(dtype: torch.dtype, head_dim: int, group: int, num_seqs: int, device_index: int) -> str:
    """The source file of the decode kernel for a launch of num_seqs rows of this shape."""
    if DECODE_KERNEL not in ("auto", "mma", "simt"):
        raise ValueError(f"{DECODE_KERNEL_ENV} must be auto, mma or simt, got {DECODE_KERNEL!r}")
    applies = (dtype in (torch.float16, torch.bfloat16) and head_dim in MMA_HEAD_SIZES and group <= 8
               and _capability(device_index) >= (8, 0))
    pays = group >= MMA_MIN_GROUP and num_seqs * group >= MMA_MIN_ROWS
    if not applies or DECODE_KERNEL == "simt" or (DECODE_KERNEL == "auto" and not pays):
        return "paged_attention.cu"
    return "paged_attention_mma.cu"


def paged_attention_options(dtype: torch.dtype, head_dim: int, block_size: int, group: int,
                            cluster_combine: bool = False) -> list[str]:
    """The -D options of one build of paged_attention.cu or paged_attention_mma.cu."""
    return [f"-DDTYPE={KERNEL_DTYPES[dtype]}", f"-DHEAD_DIM={head_dim}", f"-DBLOCK_SIZE={block_size}",
            f"-DGROUP={group}", f"-DMAX_PARTITION={MAX_PARTITION}",
            *(["-DCLUSTER_COMBINE=1", f"-DCLUSTER_MAX_PARTITION={CLUSTER_MAX_PARTITION}"] if cluster_combine else []),
            *(f"-D{k}={v}" for k, v in sorted(DECODE_TUNING.items()))]


def decode_cluster(num_groups: int, splits: int, max_seq_len: int, device_index: int,
                   limit: int = 16) -> tuple[int, int]:
    """(CTAs per cluster along grid.z, grid.z) for a launch of the CUDA-core decode kernel over
    num_groups (sequence, head group) pairs, `splits` splits and contexts up to max_seq_len, on a
    GPU that holds clusters of at most `limit` of its CTAs: grid.z is rounded up to whole
    clusters (the kernel partitions each context by its real length, so extra splits only stay
    idle). (1, splits) where clusters are off or do not apply."""
    if DECODE_CLUSTER not in [str(n) for n in range(17)]:
        raise ValueError(f"{DECODE_CLUSTER_ENV} must be an integer from 0 to 16, got {DECODE_CLUSTER!r}")
    cluster = min(int(DECODE_CLUSTER), splits, limit)
    if (cluster <= 1 or num_groups > CLUSTER_MAX_GROUPS or max_seq_len > cluster * CLUSTER_MAX_PARTITION
            or _capability(device_index) < (9, 0)):
        return 1, splits
    return cluster, math.ceil(splits / cluster) * cluster


def decode_builds(dtype: torch.dtype, head_dim: int, block_size: int, group: int,
                  device_index: int) -> list[tuple[str, list[str]]]:
    """The builds paged_decode_attention may load for a model of this shape on the GPU
    device_index (the CUDA-core kernel, its cluster-combining build on Hopper and newer, the
    tensor-core kernel where large batches take it), and the cache ops. For compile_ahead."""
    if head_dim not in HEAD_SIZES or dtype not in KERNEL_DTYPES:
        return []
    builds = [("cache_ops.cu", []),
              ("paged_attention.cu", paged_attention_options(dtype, head_dim, block_size, group))]
    if DECODE_CLUSTER.isdigit() and int(DECODE_CLUSTER) > 1 and _capability(device_index) >= (9, 0):
        builds.append(("paged_attention.cu", paged_attention_options(dtype, head_dim, block_size, group, True)))
    # The largest batches' choice: at MMA_MIN_ROWS rows the tensor cores pay wherever they apply.
    source = decode_kernel_source(dtype, head_dim, group, MMA_MIN_ROWS, device_index)
    if source == "paged_attention_mma.cu":
        builds.append((source, paged_attention_options(dtype, head_dim, block_size, group)))
    return builds


_split_counters: dict[int, torch.Tensor] = {}
# Every counter buffer ever handed out: a captured CUDA graph keeps using the one it saw.
_retired_counters: list[torch.Tensor] = []


def _counters(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed int32 counters (one per sequence and head group) with which the splits of a decode
    launch find the last of them; the kernel leaves them zero again. Grow-only and kept alive,
    because CUDA graphs hold their address."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    counters = _split_counters.get(index)
    if counters is None or counters.numel() < size:
        # A capture records the zero-fill but does not run it; an eager run of the step before
        # the capture (worker/cuda_graphs.py) allocates the counters first.
        refuse_set_up_during_capture("allocating the decode split counters")
        if counters is not None:
            _retired_counters.append(counters)
        counters = torch.zeros(max(size, 1 << 16), dtype=torch.int32, device=device)
        _split_counters[index] = counters
    return counters


def decode_partition(num_seqs: int, ctas_per_seq: int, max_seq_len: int, block_size: int,
                     num_sms: int, ctas_per_sm: Optional[int] = None) -> tuple[int, int]:
    """(unit, splits) of a decode launch: partitions are whole units of tokens, and every
    sequence gets at most `splits` of them (grid.z): enough that the grid fills the GPU a few
    CTAs deep, no more than the longest context has units, and enough that no partition of
    the longest context exceeds MAX_PARTITION."""
    unit = max(block_size, MIN_PARTITION)
    max_seq_len = max(1, max_seq_len)
    wanted = max(1, min(MAX_WANTED_SPLITS,
                        math.ceil((ctas_per_sm or _CTAS_PER_SM) * num_sms / max(1, num_seqs * ctas_per_seq))))
    splits = max(min(wanted, math.ceil(max_seq_len / unit)), math.ceil(max_seq_len / MAX_PARTITION))
    if splits > MAX_SPLITS:
        raise ValueError(f"context of {max_seq_len} tokens exceeds the decode kernel's "
                         f"{MAX_SPLITS * MAX_PARTITION}")
    return unit, splits


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
    source = decode_kernel_source(query.dtype, head_dim, group, num_seqs, device_index(query))
    mma = source == "paged_attention_mma.cu"
    unit, splits = decode_partition(num_seqs, ctas_per_seq, max_seq_len, block_size, num_sms(device_index(query)),
                                    _MMA_CTAS_PER_SM if mma else _CTAS_PER_SM)
    cluster = 1
    if not mma:
        threads = DECODE_TUNING.get("NUM_THREADS", _NUM_THREADS)
        cluster, grid_z = decode_cluster(num_seqs * ctas_per_seq, splits, max_seq_len, device_index(query))
        if cluster > 1:   # as many as this GPU holds of the clustered build's CTAs
            limit = load_module(source, paged_attention_options(query.dtype, head_dim, block_size, group, True),
                                device_index(query)).kernel("paged_decode").max_cluster_size((threads, 1, 1), 0)
            cluster, grid_z = decode_cluster(num_seqs * ctas_per_seq, splits, max_seq_len, device_index(query), limit)
        splits = grid_z
    module = load_module(source, paged_attention_options(query.dtype, head_dim, block_size, group, cluster > 1),
                         device_index(query))
    if splits > 1:
        partial_out = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=query.device)
        partial_stats = torch.empty(2, num_seqs, num_heads, splits, dtype=torch.float32, device=query.device)
        partial_ptrs = (partial_out.data_ptr(), partial_stats[0].data_ptr(), partial_stats[1].data_ptr(),
                        _counters(query.device, num_seqs * ctas_per_seq).data_ptr())
    else:
        partial_ptrs = (0, 0, 0, 0)
    if mma:
        # STAGES tiles of keys and values, NUM_WARPS * 16 tokens each, in dynamic shared memory.
        warps, stages = DECODE_TUNING.get("NUM_WARPS", _MMA_WARPS), DECODE_TUNING.get("STAGES", _MMA_STAGES)
        threads, shared = 32 * warps, stages * 2 * warps * 16 * head_dim * query.element_size()
    else:
        shared = 0
    module.kernel("paged_decode").launch(
        (ctas_per_seq, num_seqs, splits), (threads, 1, 1), shared,
        (out.data_ptr(), *partial_ptrs, query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
         block_tables.data_ptr(), seq_lens.data_ptr(), query.stride(0), out.stride(0), block_tables.stride(0),
         num_heads, num_kv_heads, float(scale), splits, unit, int(sliding_window or 0)),
        (POINTER,) * 10 + (INT64, INT64, INT, INT, INT, FLOAT, INT, INT, INT), current_stream(query), pdl=True,
        cluster_z=cluster)


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
        (POINTER,) * 5 + (INT64, INT64, INT), current_stream(key), pdl=True)


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
