"""Launchers of sampling.cu: one token per row of logits by the Gumbel-max trick, in one pass,
and the plain argmax of each row (greedy decoding)."""

from __future__ import annotations

import os

import torch

from aserve.cuda.compiler import (INT, INT64, KERNEL_DTYPES, POINTER, current_stream, device_index,
                                  load_module)

_THREADS = 1024  # SAMPLE_THREADS in sampling.cu

# Greedy rows on the GPU through argmax_rows (1, the default) or torch.argmax (0). For one
# row of Llama-3's 128,256 float32 logits, the last kernel of every B1 step, argmax_rows took
# 13.4 us and torch's reduction 29.5-30.0 us on an H200 (bench/RESULTS.md, fifteenth session).
ARGMAX_KERNEL_ENV = "ASERVE_ARGMAX_KERNEL"


def argmax_kernel_enabled() -> bool:
    choice = os.environ.get(ARGMAX_KERNEL_ENV, "1")
    if choice not in ("0", "1"):
        raise ValueError(f"{ARGMAX_KERNEL_ENV} must be 0 or 1, got {choice!r}")
    return choice == "1"


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
    strided), in one kernel with a CTA per row: the same ids, ties to the lower index and the
    first NaN winning, as torch.argmax."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and logits.dtype in KERNEL_DTYPES
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        vectorized = logits.data_ptr() % 16 == 0 and (logits.stride(0) * logits.element_size()) % 16 == 0
        module = load_module("sampling.cu", [f"-DDTYPE={KERNEL_DTYPES[logits.dtype]}"], device_index(logits))
        module.kernel("argmax_rows").launch(
            (rows, 1, 1), (_THREADS, 1, 1), 0,
            (out.data_ptr(), logits.data_ptr(), logits.stride(0), vocab, int(vectorized)),
            (POINTER, POINTER, INT64, INT, INT), current_stream(logits))
    return out
