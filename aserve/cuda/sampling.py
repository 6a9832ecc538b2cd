"""Launcher of sampling.cu: one token per row of logits by the Gumbel-max trick, in one pass."""

from __future__ import annotations

import torch

from aserve.cuda.compiler import (INT, INT64, KERNEL_DTYPES, POINTER, current_stream, device_index,
                                  load_module)

_THREADS = 1024  # SAMPLE_THREADS in sampling.cu


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
