"""Prefetching a GEMV's weight into L2 while the kernels before it leave HBM idle (l2_prefetch.cu).

At batch 1 a Llama-8B layer is four weight-streaming GEMVs with short kernels between them:
RMSNorm (~3.4 us on an H200), rotary and the KV write, and the decode attention (~10 us at 640
tokens). Those read almost nothing, so the next GEMV's weight can stream into L2 meanwhile:
all of o_proj (32 MB, ~8 us at the copy ceiling) during rotary and attention, and the first
rows of gate_up and qkv during the norms. The model calls prefetch_to_l2 right after the GEMV
that comes before such a window (models/llama.py); the kernel starts when that GEMV ends.

ASERVE_L2_PREFETCH=0 turns it off; ASERVE_L2_PREFETCH_NORM_MB sets how much of a GEMV that
follows a norm is prefetched (the window is short: more than it can carry would only compete
with the GEMV itself).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from aserve.cuda.compiler import INT, INT64, POINTER, current_stream, device_index, load_module, num_sms
from aserve.cuda.fused import kernels_enabled

PREFETCH_ENV = "ASERVE_L2_PREFETCH"
NORM_WINDOW_ENV = "ASERVE_L2_PREFETCH_NORM_MB"
# Bytes one thread asks for per instruction: 16 KB over a grid of one 32-thread CTA per SM
# covers o_proj's 32 MB in ~8 instructions a thread.
_CHUNK_BYTES = 16 * 1024
_THREADS = 32


def _setting(name: str, default: str) -> str:
    return os.environ.get(name, default)


def prefetch_enabled(weight: torch.Tensor) -> bool:
    """Whether prefetch_to_l2 does anything for this weight: on by default on Hopper and newer
    (the bulk prefetch instruction), with aserve's kernels enabled."""
    choice = _setting(PREFETCH_ENV, "0")
    if choice not in ("0", "1"):
        raise ValueError(f"{PREFETCH_ENV} must be 0 or 1, got {choice!r}")
    return choice == "1" and weight.is_cuda and _hopper_or_newer(device_index(weight)) and kernels_enabled()


def norm_window_bytes() -> int:
    """How much of a GEMV that follows an RMSNorm to prefetch during the norm."""
    value = _setting(NORM_WINDOW_ENV, "12")
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"{NORM_WINDOW_ENV} must be a number of megabytes, got {value!r}") from None
    if megabytes < 0:
        raise ValueError(f"{NORM_WINDOW_ENV} must not be negative, got {value!r}")
    return int(megabytes * 1024 * 1024)


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def prefetch_to_l2(weight: torch.Tensor, max_bytes: Optional[int] = None) -> None:
    """Ask L2 for the first max_bytes (all by default) of weight's storage, once the kernel
    launched before this call has finished. A hint: nothing waits for it, and the weight's
    readers are correct whether it lands or not. Does nothing unless prefetch_enabled(weight)."""
    if not prefetch_enabled(weight):
        return
    nbytes = weight.numel() * weight.element_size()
    if max_bytes is not None:
        nbytes = min(nbytes, max_bytes)
    nbytes -= nbytes % 16          # the instruction takes multiples of 16 bytes
    if nbytes <= 0 or weight.data_ptr() % 16:
        return
    index = device_index(weight)
    module = load_module("l2_prefetch.cu", [], index)
    module.kernel("l2_prefetch").launch(
        (num_sms(index), 1, 1), (_THREADS, 1, 1), 0, (weight.data_ptr(), nbytes, _CHUNK_BYTES),
        (POINTER, INT64, INT), current_stream(weight), pdl=True)
