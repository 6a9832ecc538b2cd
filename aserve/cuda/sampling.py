"""Launchers of sampling.cu: one token per row of logits by the Gumbel-max trick, in one pass,
and the plain argmax of each row (greedy decoding)."""

from __future__ import annotations

import os

import torch

from aserve.cuda.compiler import (INT, INT64, KERNEL_DTYPES, POINTER, capability, current_stream,
                                  device_index, env_switch, load_module, num_sms)

_THREADS = 1024  # SAMPLE_THREADS in sampling.cu

# Greedy rows on the GPU through argmax_rows (1, the default) or torch.argmax (0). For one
# row of Llama-3's 128,256 bfloat16 logits, the last kernel of every B1 step, argmax_rows took
# 13.4 us and torch's reduction 29.5-30.0 us on an H200 (bench/RESULTS.md, fifteenth session).
ARGMAX_KERNEL_ENV = "ASERVE_ARGMAX_KERNEL"


def argmax_kernel_enabled() -> bool:
    return env_switch(ARGMAX_KERNEL_ENV, "1")


# The most parts (CTAs of one thread block cluster, Hopper and newer) argmax_rows cuts a row
# into where few rows would leave most SMs idle; 1: one CTA a row, launched without PDL. On
# the H200 a lone row of 128,256 bfloat16 logits took 13.7 us in one CTA and 5.9 us in a
# cluster of 16 (B1 chain 4.240 -> 4.218 ms a step; bench/RESULTS.md, 2026-12-04).
ARGMAX_PARTS_ENV = "ASERVE_ARGMAX_PARTS"
ARGMAX_MAX_PARTS = 16


def argmax_max_parts() -> int:
    """ASERVE_ARGMAX_PARTS, checked."""
    setting = os.environ.get(ARGMAX_PARTS_ENV, str(ARGMAX_MAX_PARTS))
    if setting not in [str(n) for n in range(1, ARGMAX_MAX_PARTS + 1)]:
        raise ValueError(f"{ARGMAX_PARTS_ENV} must be an integer from 1 to {ARGMAX_MAX_PARTS}, got {setting!r}")
    return int(setting)


def argmax_parts(rows: int, vocab: int, element_size: int, sms: int, cluster_limit: int, max_parts: int) -> int:
    """CTAs per row of an argmax_rows launch: at most max_parts and the GPU's cluster limit, no
    more than one 16-byte load a thread, and rows x parts within the SMs."""
    per_cta = _THREADS * 16 // element_size   # elements one CTA loads in a pass
    parts = min(max_parts, cluster_limit, -(-vocab // per_cta), sms // max(rows, 1))
    return max(parts, 1)


def sample_gumbel_max(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """ids [rows] int64: argmax_i logits[r, i] / T_r + gumbel(keys[r], i), or the argmax of the
    row where T_r is 0. logits [rows, vocab] on the GPU (columns dense); temperatures float32
    and keys int64, [rows] on the same device. aserve/worker/gumbel.py is the reference."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and logits.dtype in KERNEL_DTYPES
    assert temperatures.dtype == torch.float32 and temperatures.is_contiguous() and temperatures.numel() == rows
    assert keys.dtype == torch.int64 and keys.is_contiguous() and keys.numel() == rows
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        module = load_module("sampling.cu", [f"-DDTYPE={KERNEL_DTYPES[logits.dtype]}"], device_index(logits))
        module.kernel("sample_gumbel_max").launch(
            (rows, 1, 1), (_THREADS, 1, 1), 0,
            (out.data_ptr(), logits.data_ptr(), logits.stride(0), vocab, temperatures.data_ptr(), keys.data_ptr()),
            (POINTER, POINTER, INT64, INT, POINTER, POINTER), current_stream(logits))
    return out


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) for logits [rows, vocab] on the GPU (columns dense, rows may be
    strided), in one kernel: the same ids, ties to the lower index and the first NaN winning,
    as torch.argmax. A row takes one CTA, or on Hopper up to ASERVE_ARGMAX_PARTS CTAs of one
    thread block cluster (argmax_parts)."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and logits.dtype in KERNEL_DTYPES
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        index = device_index(logits)
        vectorized = logits.data_ptr() % 16 == 0 and (logits.stride(0) * logits.element_size()) % 16 == 0
        kernel = load_module("sampling.cu", [f"-DDTYPE={KERNEL_DTYPES[logits.dtype]}"], index).kernel("argmax_rows")
        max_parts, parts = argmax_max_parts(), 1
        if max_parts > 1 and capability(index) >= (9, 0):   # thread block clusters: Hopper on
            limit = kernel.max_cluster_size((_THREADS, 1, 1), 0)
            parts = argmax_parts(rows, vocab, logits.element_size(), num_sms(index), limit, max_parts)
        # The parts of a row must share a cluster (the kernel combines them through its shared
        # memory); the clustered launch also goes under PDL, to start under the LM head.
        kernel.launch((rows, 1, parts), (_THREADS, 1, 1), 0,
                      (out.data_ptr(), logits.data_ptr(), logits.stride(0), vocab, int(vectorized)),
                      (POINTER, POINTER, INT64, INT, INT), current_stream(logits), pdl=parts > 1, cluster_z=parts)
    return out
