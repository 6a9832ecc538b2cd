"""Fused layer ops on CUDA (layer_ops.cu): RMSNorm, LayerNorm, rotary embedding (alone or with
the KV-cache write), SiLU-and-mul.

The model layers call `usable(x)` and take these when it holds, their torch code otherwise;
the torch code is the reference tests/test_cuda_kernels.py compares against. The profile of a
Llama-8B decode step showed these chains of small torch ops costing about a quarter of the
GPU time at batch 1 (bench/RESULTS.md).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch

from aserve.cuda.compiler import (FLOAT, INT, INT64, KERNEL_DTYPES, POINTER, current_stream,
                                  device_index, load_module, nvrtc_version)

logger = logging.getLogger(__name__)

# ASERVE_KERNELS=torch turns every aserve CUDA kernel off (the torch reference runs instead).
KERNELS_ENV = "ASERVE_KERNELS"


def kernels_enabled() -> bool:
    """Whether aserve's CUDA kernels may run: not turned off, and NVRTC and the driver API
    are there (without them a GPU still serves, through the torch ops, with a warning)."""
    choice = os.environ.get(KERNELS_ENV, "auto")
    if choice not in ("auto", "torch"):
        raise ValueError(f"{KERNELS_ENV} must be auto or torch, got {choice!r}")
    return choice == "auto" and kernels_available()


@functools.lru_cache(maxsize=None)
def kernels_available() -> bool:
    try:
        from cuda.bindings import driver  # noqa: F401

        nvrtc_version()
        return True
    except Exception as exc:  # no cuda-python, or no NVRTC library for it
        logger.warning("aserve's CUDA kernels are unavailable (%s: %s); attention and the fused "
                       "layer ops fall back to slower torch code. Install NVRTC with "
                       'pip install "cuda-python[all]".', type(exc).__name__, exc)
        return False


def usable(x: torch.Tensor) -> bool:
    """Whether the fused kernels can take x: on a GPU, in a supported dtype, kernels enabled."""
    return x.is_cuda and x.dtype in KERNEL_DTYPES and kernels_enabled()


def _module(x: torch.Tensor):
    return load_module("layer_ops.cu", [f"-DDTYPE={KERNEL_DTYPES[x.dtype]}"], device_index(x))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, columns] with dense columns (a row stride of its own is fine)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# 16-byte vectors each rms_norm_vec thread keeps in registers (RMS_VECS in layer_ops.cu).
_RMS_VECS = 4


def _vectorizable(width: int, tensors: list[torch.Tensor], strides: list[int]) -> bool:
    """Whether rows of `width` elements can move in 16-byte vectors: width and every row
    stride a whole number of vectors, every tensor's base pointer on a 16-byte boundary."""
    vec = 16 // tensors[0].element_size()
    return (width % vec == 0 and all(s % vec == 0 for s in strides)
            and all(t.data_ptr() % 16 == 0 for t in tensors))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """weight * (h * rsqrt(mean(h^2, -1) + eps)).to(x.dtype), as HF's LlamaRMSNorm, with h = x,
    or h = residual + x when a residual is given, which then holds h on return (in place)."""
    rows = _rows(x)
    hidden = rows.shape[1]
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    res_rows = None
    if residual is not None:
        res_rows = residual.view(-1, hidden)
        assert res_rows.stride(1) == 1 and residual.dtype == x.dtype
    if rows.shape[0]:
        weight = weight.to(x.dtype).contiguous()
        res_stride = res_rows.stride(0) if res_rows is not None else 0
        operands = [out, rows, weight] + ([res_rows] if res_rows is not None else [])
        vectors = hidden * x.element_size() // 16
        if (_vectorizable(hidden, operands, [rows.stride(0), res_stride, out.stride(0)])
                and vectors <= _RMS_VECS * 1024):
            # Threads enough that each holds at most _RMS_VECS vectors: all its loads in flight.
            name, threads = "rms_norm_vec", min(1024, 32 * -(-vectors // (32 * _RMS_VECS)))
        else:
            name, threads = "rms_norm", min(1024, 32 * ((hidden + 255) // 256))
        _module(x).kernel(name).launch(
            (rows.shape[0], 1, 1), (threads, 1, 1), 0,
            (out.data_ptr(), rows.data_ptr(), res_rows.data_ptr() if res_rows is not None else 0,
             weight.data_ptr(), rows.stride(0), res_stride, out.stride(0), hidden, float(eps)),
            (POINTER, POINTER, POINTER, POINTER, INT64, INT64, INT64, INT, FLOAT), current_stream(x), pdl=True)
    return out.view(x.shape)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float) -> torch.Tensor:
    """torch.nn.functional.layer_norm(x, (hidden,), weight, bias, eps) over x's last dimension;
    weight and bias may each be None. The same float32 arithmetic as torch's kernel, rounded
    once; unlike torch's, it takes part in programmatic dependent launch."""
    rows = _rows(x)
    hidden = rows.shape[1]
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        weight = weight.to(x.dtype).contiguous() if weight is not None else None
        bias = bias.to(x.dtype).contiguous() if bias is not None else None
        operands = [out, rows] + [t for t in (weight, bias) if t is not None]
        vectors = hidden * x.element_size() // 16
        if (_vectorizable(hidden, operands, [rows.stride(0), out.stride(0)])
                and vectors <= _RMS_VECS * 1024):
            name, threads = "layer_norm_vec", min(1024, 32 * -(-vectors // (32 * _RMS_VECS)))
        else:
            name, threads = "layer_norm", min(1024, 32 * ((hidden + 255) // 256))
        _module(x).kernel(name).launch(
            (rows.shape[0], 1, 1), (threads, 1, 1), 0,
            (out.data_ptr(), rows.data_ptr(), weight.data_ptr() if weight is not None else 0,
             bias.data_ptr() if bias is not None else 0, rows.stride(0), out.stride(0), hidden, float(eps)),
            (POINTER, POINTER, POINTER, POINTER, INT64, INT64, INT, FLOAT), current_stream(x), pdl=True)
    return out.view(x.shape)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_cache: torch.Tensor, sin_cache: torch.Tensor, head_dim: int) -> None:
    """Rotate query [T, H*D] and key [T, KVH*D] in place (rotate-half form) at positions [T];
    cos/sin_cache: float32 [max_position, head_dim]."""
    num_tokens = query.shape[0]
    if num_tokens == 0:
        return
    assert query.stride(-1) == 1 and key.stride(-1) == 1 and key.dtype == query.dtype
    if _vectorizable(head_dim // 2, [query, key], [query.stride(0), key.stride(0), head_dim]):
        _rotary_vec(positions, query, key, cos_cache, sin_cache, head_dim)
        return
    assert cos_cache.dtype == torch.float32 and cos_cache.is_contiguous() and sin_cache.is_contiguous()
    positions = positions.to(torch.int64).contiguous()
    num_heads, num_kv_heads = query.shape[1] // head_dim, key.shape[1] // head_dim
    pairs = (num_heads + num_kv_heads) * (head_dim // 2)
    _module(query).kernel("rotary_embedding").launch(
        (num_tokens, 1, 1), (min(512, 32 * ((pairs + 31) // 32)), 1, 1), 0,
        (query.data_ptr(), key.data_ptr(), positions.data_ptr(), cos_cache.data_ptr(), sin_cache.data_ptr(),
         query.stride(0), key.stride(0), num_heads, num_kv_heads, head_dim),
        (POINTER,) * 5 + (INT64, INT64, INT, INT, INT), current_stream(query), pdl=True)


def rotary_embedding_and_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               slot_mapping: torch.Tensor, cos_cache: torch.Tensor,
                               sin_cache: torch.Tensor, head_dim: int) -> bool:
    """rotary_embedding, then key and value [T, KVH*D] stored at their slots of k_cache/v_cache
    ([..., KVH, D], contiguous; slots < 0 are skipped), in one kernel. Returns False, having done
    nothing, where that kernel does not apply (dtypes differ from the cache's, rows not in
    16-byte vectors): the caller then rotates and stores separately."""
    if (key.dtype != query.dtype or value.dtype != query.dtype or k_cache.dtype != query.dtype
            or v_cache.dtype != query.dtype or not (k_cache.is_contiguous() and v_cache.is_contiguous())
            or query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1
            or not _vectorizable(head_dim // 2, [query, key, value, k_cache, v_cache],
                                 [query.stride(0), key.stride(0), value.stride(0), head_dim])):
        return False
    if query.shape[0]:
        assert slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
        _rotary_vec(positions, query, key, cos_cache, sin_cache, head_dim, value, k_cache, v_cache, slot_mapping)
    return True


def _rotary_vec(positions, query, key, cos_cache, sin_cache, head_dim, value=None, k_cache=None,
                v_cache=None, slot_mapping=None) -> None:
    """rotary_embedding_cache_vec: the vectorized rotation, with the cache write when given a
    slot mapping (its inputs checked by the callers)."""
    assert cos_cache.dtype == torch.float32 and cos_cache.is_contiguous() and sin_cache.is_contiguous()
    positions = positions.to(torch.int64).contiguous()
    num_heads, num_kv_heads = query.shape[1] // head_dim, key.shape[1] // head_dim
    vec = 16 // query.element_size()
    # One thread per rotated VEC pairs; enough for the value row's vectors too, which are never
    # more ((H + KVH) * D / 2 >= KVH * D).
    items = (num_heads + num_kv_heads) * (head_dim // 2) // vec
    threads = min(512, 32 * ((items + 31) // 32))

    def ptr(t):
        return t.data_ptr() if t is not None else 0

    _module(query).kernel("rotary_embedding_cache_vec").launch(
        (query.shape[0], 1, 1), (threads, 1, 1), 0,
        (query.data_ptr(), key.data_ptr(), ptr(value), ptr(k_cache), ptr(v_cache), ptr(slot_mapping),
         positions.data_ptr(), cos_cache.data_ptr(), sin_cache.data_ptr(),
         query.stride(0), key.stride(0), value.stride(0) if value is not None else 0,
         num_heads, num_kv_heads, head_dim),
        (POINTER,) * 9 + (INT64, INT64, INT64, INT, INT, INT), current_stream(query), pdl=True)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] for x [..., 2d]."""
    rows = _rows(x)
    d = rows.shape[1] // 2
    out = torch.empty(rows.shape[0], d, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        threads = 256
        name, items = "silu_and_mul", d
        if _vectorizable(d, [rows, out], [rows.stride(0), out.stride(0)]):
            name, items = "silu_and_mul_vec", d * x.element_size() // 16
        # Enough CTAs per row that one row (a decode step) is spread over several SMs, at
        # most 64 (a long prompt's rows give parallelism of their own).
        chunks = max(1, min(64, -(-items // threads)))
        _module(x).kernel(name).launch(
            (rows.shape[0], chunks, 1), (threads, 1, 1), 0,
            (out.data_ptr(), rows.data_ptr(), rows.stride(0), out.stride(0), d),
            (POINTER, POINTER, INT64, INT64, INT), current_stream(x), pdl=True)
    return out.view(*x.shape[:-1], d)
