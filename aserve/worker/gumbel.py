"""Sampling by the Gumbel-max trick with hashed noise: argmax_i logits_i / T + g_i picks token i
with probability softmax(logits / T)_i when the g_i are independent Gumbel(0, 1) draws.

The noise of token i is a hash of (the row's 64-bit key, i), so a row's draw depends on its key
alone: the sampler takes each row's key from that row's generator, and a seeded request draws
the same tokens at any position of any batch. On a GPU one kernel does the whole sampling in
one pass over the logits (aserve/cuda/sampling.cu); the code here computes the same noise (the
same uniforms bit for bit, the kernel's fast logarithms aside), and is the CPU's sampler and
the kernel's reference in the tests.
"""

from __future__ import annotations

import numpy as np
import torch

# Elements of [rows, vocab] the reference handles at once, bounding its temporaries.
_REFERENCE_CHUNK = 1 << 22


def _mix32(x: np.ndarray) -> np.ndarray:
    """sampling.cu's mix32, in place on uint32 words (numpy's uint32 arithmetic wraps as CUDA's)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x21F0AAAD)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0xD35A2D97)
    x ^= x >> np.uint32(15)
    return x


def gumbel_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] float32 on the CPU: the noise sampling.cu adds to row r's scaled logits
    under keys[r] (int64)."""
    k = keys.detach().cpu().numpy().astype(np.int64).view(np.uint64)
    lo = (k & np.uint64(0xFFFFFFFF)).astype(np.uint32)[:, None]
    hi = (k >> np.uint64(32)).astype(np.uint32)[:, None]
    h = np.arange(vocab, dtype=np.uint32)[None, :] ^ lo
    h = _mix32(_mix32(h) + hi)
    # v = (2k + 1) 2^-24 from the top 23 bits: exact in float32, never 0 or 1.
    v = torch.from_numpy(((h >> np.uint32(9)) * np.uint32(2) + np.uint32(1)).astype(np.float32)) * 2.0 ** -24
    q = torch.where(v < 2.0 ** -10, v * (1 + 0.5 * v), -torch.log1p(-v))
    return q.log_().neg_()


def sample_gumbel_max_reference(logits: torch.Tensor, temperatures: torch.Tensor,
                                keys: torch.Tensor) -> torch.Tensor:
    """ids [rows]: what sampling.cu's kernel computes (rows with temperature 0 take the argmax
    of their logits), a chunk of rows at a time."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    step = max(1, _REFERENCE_CHUNK // max(1, vocab))   # rows at a time: bounded temporaries
    for start in range(0, rows, step):
        part = slice(start, start + step)
        temps = temperatures[part]
        greedy = ~(temps > 0)
        inv_t = torch.where(greedy, torch.ones_like(temps), 1.0 / temps)
        scores = logits[part].float() * inv_t.unsqueeze(1)
        noisy = scores + gumbel_noise(keys[part], vocab).to(scores.device)
        out[part] = torch.where(greedy.unsqueeze(1), scores, noisy).argmax(dim=-1)
    return out


def sample_gumbel_max(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """ids [rows] int64 on the logits' device. temperatures: float32 [rows] (0: greedy);
    keys: int64 [rows]. The kernel on a GPU, the reference elsewhere."""
    from aserve.cuda.fused import usable

    if usable(logits) and logits.stride(1) == 1:
        from aserve.cuda.sampling import sample_gumbel_max as kernel

        return kernel(logits, temperatures.float().contiguous(), keys.contiguous())
    return sample_gumbel_max_reference(logits, temperatures.to(logits.device), keys.to(logits.device))


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1): on a GPU through sampling.cu's argmax_rows (the same ids)
    unless ASERVE_ARGMAX_KERNEL=0, else torch's."""
    from aserve.cuda.fused import usable

    if usable(logits) and logits.dim() == 2 and logits.stride(1) == 1:
        from aserve.cuda.sampling import argmax_kernel_enabled, argmax_rows

        if argmax_kernel_enabled():
            return argmax_rows(logits)
    return logits.argmax(dim=-1)
