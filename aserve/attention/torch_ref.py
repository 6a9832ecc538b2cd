"""The torch reference attention backend: plain tensor ops over the paged KV cache.

It runs on any device and is the oracle that the CUDA kernels are tested against. The KV cache
of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim] (keys, values).
"""

from __future__ import annotations

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


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                    scale: float, sliding_window: Optional[int] = None) -> torch.Tensor:
    """Causal attention of each sequence's queries over its cached context.

    query: [T, num_heads, head_dim]; returns [T, num_heads, head_dim]. The K/V of this step
    must already be in the cache (write_kv_cache), so prefill, chunked prefill and decode are
    one code path. Grouped-query attention repeats each KV head over its query heads.
    Computed in float32 whatever the cache's dtype, as the oracle should be.
    """
    out = torch.empty_like(query)
    starts = _starts(metadata.query_lens_cpu)   # host lists: no device synchronisation
    for first in range(0, metadata.num_seqs, _SEQS_PER_GROUP):
        last = min(first + _SEQS_PER_GROUP, metadata.num_seqs)
        token_lo, token_hi = starts[first], starts[last]
        out[token_lo:token_hi] = _attend_group(
            query[token_lo:token_hi], kv_cache, metadata.block_tables[first:last],
            metadata.query_lens_cpu[first:last], metadata.seq_lens_cpu[first:last], scale,
            sliding_window).to(query.dtype)
    return out


def _attend_group(query, kv_cache, block_tables, query_lens, seq_lens, scale, sliding_window):
    device = query.device
    num_seqs, num_heads = len(query_lens), query.shape[1]
    max_q, max_s = max(query_lens), max(seq_lens)
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    q_lens = torch.tensor(query_lens, device=device)
    s_lens = torch.tensor(seq_lens, device=device)
    # Scatter the flat queries into a padded [B, max_q, H, D] batch.
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens)
    token_starts = torch.cumsum(q_lens, 0) - q_lens
    row_of_token = torch.arange(query.shape[0], device=device) - token_starts[seq_of_token]
    padded_q = query.new_zeros(num_seqs, max_q, num_heads, query.shape[2], dtype=torch.float32)
    padded_q[seq_of_token, row_of_token] = query.float()
    # Gather each sequence's keys and values through its block table: [B, max_s, KVH, D].
    blocks = block_tables[:, :-(-max_s // block_size)].long()
    keys = kv_cache[0][blocks].flatten(1, 2)[:, :max_s].float()
    values = kv_cache[1][blocks].flatten(1, 2)[:, :max_s].float()
    # Query i of a sequence sits at position seq_len - query_len + i and sees keys up to it.
    q_pos = (s_lens - q_lens).unsqueeze(1) + torch.arange(max_q, device=device)     # [B, max_q]
    k_pos = torch.arange(max_s, device=device)
    in_context = k_pos.view(1, -1) < s_lens.view(-1, 1)                                 # [B, max_s]
    # Slots past a sequence's end hold whatever the cache had (maybe NaN): zero them, since
    # a masked score or probability does not cancel a NaN.
    outside = ~in_context.view(num_seqs, max_s, 1, 1)
    keys.masked_fill_(outside, 0.0)
    values.masked_fill_(outside, 0.0)
    visible = (k_pos.view(1, 1, -1) <= q_pos.unsqueeze(2)) & in_context.unsqueeze(1)
    if sliding_window is not None:
        visible &= k_pos.view(1, 1, -1) > q_pos.unsqueeze(2) - sliding_window
    # SDPA rather than einsum: einsum plans every new shape anew (~15 ms on this CPU), and
    # continuous batching produces a new shape nearly every step.
    padded_out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=visible.unsqueeze(1), scale=scale, enable_gqa=num_heads != num_kv_heads)
    return padded_out.transpose(1, 2)[seq_of_token, row_of_token]


def _starts(lengths: list[int]) -> list[int]:
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    return starts


class TorchReferenceBackend:
    """Attention through write_kv_cache + paged_attention; the CPU path and the tests' oracle."""

    name = "torch"

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                sliding_window: Optional[int] = None) -> torch.Tensor:
        write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        return paged_attention(query, kv_cache, metadata, scale, sliding_window)
