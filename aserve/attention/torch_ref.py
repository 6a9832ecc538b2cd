"""The torch reference attention backend: plain tensor ops over the paged KV cache.

It runs on any device and is the oracle that the CUDA kernels are tested against. The KV cache
of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim] (keys, values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from aserve.attention.metadata import AttentionMetadata


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values [T, kv_heads, head_dim] at their cache slots."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


# Sequences are attended in groups, padded to the group's longest query and context: a few
# batched ops per group instead of a few per sequence, with bounded padding memory.
_SEQS_PER_GROUP = 32


@dataclass(frozen=True)
class _GroupPlan:
    """One group's padded layout, derived once per step and shared by every layer."""

    token_lo: int
    token_hi: int
    seq_of_token: torch.Tensor   # [t] the group-local sequence of each token
    row_of_token: torch.Tensor   # [t] its row in that sequence's padded queries
    blocks: torch.Tensor         # [B, blocks covering max_s] block ids
    outside: torch.Tensor        # [B, max_s, 1, 1] key slots past the sequence's end
    visible: torch.Tensor        # [B, 1, max_q, max_s] causal (and sliding-window) mask
    max_q: int
    max_s: int


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                    scale: float, sliding_window: Optional[int] = None,
                    logits_soft_cap: Optional[float] = None) -> torch.Tensor:
    """Causal attention of each sequence's queries over its cached context.

    query: [T, num_heads, head_dim]; returns [T, num_heads, head_dim]. The K/V of this step
    must already be in the cache (write_kv_cache), so prefill, chunked prefill and decode are
    one code path. Grouped-query attention repeats each KV head over its query heads.
    Computed in float32 whatever the cache's dtype, as the oracle should be. logits_soft_cap
    (Gemma 2): each score s becomes cap * tanh(s / cap) before the softmax.
    """
    key = ("torch_ref", kv_cache.shape[2], sliding_window)
    plans = metadata.backend_cache.get(key)
    if plans is None:
        plans = metadata.backend_cache[key] = _plan_groups(metadata, kv_cache.shape[2],
                                                           sliding_window, query.device)
    out = torch.empty_like(query)
    for plan in plans:
        out[plan.token_lo:plan.token_hi] = _attend_group(
            query[plan.token_lo:plan.token_hi], kv_cache, plan, scale, logits_soft_cap).to(query.dtype)
    return out


def _plan_groups(metadata: AttentionMetadata, block_size: int, sliding_window: Optional[int],
                 device: torch.device) -> list[_GroupPlan]:
    # Built from the host lists, so planning never waits on the device.
    starts = _starts(metadata.query_lens_cpu)
    plans = []
    for first in range(0, metadata.num_seqs, _SEQS_PER_GROUP):
        last = min(first + _SEQS_PER_GROUP, metadata.num_seqs)
        query_lens = metadata.query_lens_cpu[first:last]
        seq_lens = metadata.seq_lens_cpu[first:last]
        num_seqs, max_q, max_s = len(query_lens), max(query_lens), max(seq_lens)
        seq_of_token = [i for i, n in enumerate(query_lens) for _ in range(n)]
        row_of_token = [r for n in query_lens for r in range(n)]
        q_lens = torch.tensor(query_lens, device=device)
        s_lens = torch.tensor(seq_lens, device=device)
        # Query i of a sequence sits at position seq_len - query_len + i and sees keys up to it.
        q_pos = (s_lens - q_lens).unsqueeze(1) + torch.arange(max_q, device=device)   # [B, max_q]
        k_pos = torch.arange(max_s, device=device)
        in_context = k_pos.view(1, -1) < s_lens.view(-1, 1)                               # [B, max_s]
        visible = (k_pos.view(1, 1, -1) <= q_pos.unsqueeze(2)) & in_context.unsqueeze(1)
        if sliding_window is not None:
            visible &= k_pos.view(1, 1, -1) > q_pos.unsqueeze(2) - sliding_window
        plans.append(_GroupPlan(
            token_lo=starts[first], token_hi=starts[last],
            seq_of_token=torch.tensor(seq_of_token, device=device),
            row_of_token=torch.tensor(row_of_token, device=device),
            blocks=metadata.block_tables[first:last, :-(-max_s // block_size)].long(),
            outside=~in_context.view(num_seqs, max_s, 1, 1), visible=visible.unsqueeze(1),
            max_q=max_q, max_s=max_s))
    return plans


def _attend_group(query: torch.Tensor, kv_cache: torch.Tensor, plan: _GroupPlan, scale: float,
                  logits_soft_cap: Optional[float] = None):
    num_seqs = plan.blocks.shape[0]
    num_heads, num_kv_heads = query.shape[1], kv_cache.shape[3]
    padded_q = query.new_zeros(num_seqs, plan.max_q, num_heads, query.shape[2], dtype=torch.float32)
    padded_q[plan.seq_of_token, plan.row_of_token] = query.float()
    # Each sequence's keys and values through its block table: [B, max_s, KVH, D]. Slots past
    # a sequence's end hold whatever the cache had (maybe NaN): zero them, since a masked score
    # or probability does not cancel a NaN.
    keys = kv_cache[0][plan.blocks].flatten(1, 2)[:, :plan.max_s].float().masked_fill_(plan.outside, 0.0)
    values = kv_cache[1][plan.blocks].flatten(1, 2)[:, :plan.max_s].float().masked_fill_(plan.outside, 0.0)
    q, k, v = padded_q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
    if logits_soft_cap is not None:
        padded_out = _soft_capped_attention(q, k, v, plan.visible, scale, logits_soft_cap)
    else:
        # SDPA rather than einsum: einsum plans every new shape anew (~15 ms on the CPU machine),
        # and continuous batching produces a new shape nearly every step.
        padded_out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.visible, scale=scale,
                                                    enable_gqa=num_heads != num_kv_heads)
    return padded_out.transpose(1, 2)[plan.seq_of_token, plan.row_of_token]


def _soft_capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                           scale: float, cap: float) -> torch.Tensor:
    """SDPA's attention with each score capped as cap * tanh(score / cap), which SDPA cannot
    do; q [B, H, q, D], k and v [B, KVH, s, D] (each KV head serves H / KVH query heads)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    # A padded query row sees nothing: its NaNs are never read, but keep them out of the sum.
    return torch.matmul(probs.nan_to_num(0.0), v)


def _starts(lengths: list[int]) -> list[int]:
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    return starts


class TorchReferenceBackend:
    """Attention through write_kv_cache + paged_attention; the CPU path and the tests' oracle."""

    name = "torch"
    fuses_rotary = False

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                sliding_window: Optional[int] = None, kv_cached: bool = False,
                logits_soft_cap: Optional[float] = None) -> torch.Tensor:
        if not kv_cached:
            write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        return paged_attention(query, kv_cache, metadata, scale, sliding_window, logits_soft_cap)
