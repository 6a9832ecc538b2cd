"""The torch reference's soft-capped attention (Gemma 2): each score s becomes cap * tanh(s / cap)
before the softmax, over the paged cache, with grouped-query heads and a sliding window."""

from __future__ import annotations

import torch

from aserve.attention import AttentionMetadata
from aserve.attention.torch_ref import paged_attention, write_kv_cache

BLOCK, HEADS, KV_HEADS, DIM = 4, 4, 2, 8


def _step(lengths: list[int], gen: torch.Generator):
    """One prefill step of sequences of these lengths over shuffled cache blocks."""
    num_blocks = sum(-(-n // BLOCK) for n in lengths) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for n in lengths:
        table = [order.pop() for _ in range(-(-n // BLOCK))]
        tables.append(table)
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)]
    width = max(map(len, tables))
    metadata = AttentionMetadata(
        num_tokens=sum(lengths),
        query_start_loc=torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32),
        seq_lens=torch.tensor(lengths, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots), max_query_len=max(lengths), max_seq_len=max(lengths),
        query_lens_cpu=list(lengths), seq_lens_cpu=list(lengths))
    cache = torch.randn(2, num_blocks, BLOCK, KV_HEADS, DIM, generator=gen)   # garbage, never zeros
    t = sum(lengths)
    q = torch.randn(t, HEADS, DIM, generator=gen) * 3
    k, v = torch.randn(t, KV_HEADS, DIM, generator=gen) * 3, torch.randn(t, KV_HEADS, DIM, generator=gen)
    write_kv_cache(k, v, cache, metadata.slot_mapping)
    return q, k, v, cache, metadata


def _expected(q, k, v, lengths, scale, cap, window):
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = q[start:start + n], k[start:start + n], v[start:start + n]
        ks, vs = ks.repeat_interleave(HEADS // KV_HEADS, 1), vs.repeat_interleave(HEADS // KV_HEADS, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        scores = torch.tanh(scores / cap) * cap
        pos = torch.arange(n)
        visible = pos[None, :] <= pos[:, None]
        if window is not None:
            visible &= pos[None, :] > pos[:, None] - window
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
        out.append(torch.einsum("hqk,khd->qhd", probs, vs))
        start += n
    return torch.cat(out)


def test_capped_scores_match_the_definition_with_gqa_and_a_window():
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 1, 13]
    q, k, v, cache, metadata = _step(lengths, gen)
    for window in (None, 5):
        got = paged_attention(q, cache, metadata, 0.5, window, logits_soft_cap=2.0)
        torch.testing.assert_close(got, _expected(q, k, v, lengths, 0.5, 2.0, window), rtol=1e-5, atol=1e-5)


def test_a_cap_far_above_the_scores_changes_nothing():
    gen = torch.Generator().manual_seed(1)
    q, _, _, cache, metadata = _step([9, 4], gen)
    torch.testing.assert_close(paged_attention(q, cache, metadata, 0.3, None, logits_soft_cap=1e7),
                               paged_attention(q, cache, metadata, 0.3), rtol=1e-4, atol=1e-5)
