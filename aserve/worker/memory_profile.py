"""The step that sizes the KV cache on a GPU: the largest step the scheduler can make, run once
on a throwaway cache before the real one is allocated, so that the activation peak it reaches
is kept free (worker/kv_cache.num_blocks_for_budget reads it)."""

from __future__ import annotations

import itertools

import torch

from aserve.attention import AttentionMetadata
from aserve.worker.kv_cache import allocate_kv_caches


def profile_step_lengths(max_num_batched_tokens: int, max_seq_len: int, max_num_seqs: int) -> list[int]:
    """The prompt lengths of the largest step the scheduler can make: max_num_batched_tokens
    tokens, in sequences of at most max_seq_len (chunked prefill fills a step with several
    prompts), and at most max_num_seqs of them."""
    num_tokens = min(max_num_batched_tokens, max_seq_len * max_num_seqs)
    full, rest = divmod(num_tokens, max_seq_len)
    return [max_seq_len] * full + ([rest] if rest else [])


@torch.inference_mode()
def profile_forward(model, device: torch.device, dtype: torch.dtype, max_num_batched_tokens: int,
                    max_seq_len: int, max_num_seqs: int, block_size: int) -> int:
    """Run the largest step the scheduler can make (profile_step_lengths' prompts, logits for
    one row a sequence up to max_num_seqs rows) so the caller can read the activation peak.
    As vLLM's profile run, it holds all of max_num_batched_tokens: a step of 16384 tokens needs
    four times the activations of one 4096-token prompt. Returns the bytes of the throwaway KV
    cache it wrote, which the peak includes but the real cache replaces."""
    lengths = profile_step_lengths(max_num_batched_tokens, max_seq_len, max_num_seqs)
    num_tokens = sum(lengths)
    blocks = [-(-n // block_size) for n in lengths]
    kv_caches = allocate_kv_caches(model, sum(blocks), block_size, dtype, device)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    # Each sequence its own blocks, numbered in order: its slots are its block's slots.
    first_block = [0, *itertools.accumulate(blocks)][:-1]
    slots = torch.cat([torch.arange(n, device=device) + b * block_size for n, b in zip(lengths, first_block)])
    tables = torch.zeros(len(lengths), max(blocks), dtype=torch.int32, device=device)
    for row, (count, first) in enumerate(zip(blocks, first_block)):
        tables[row, :count] = torch.arange(first, first + count, dtype=torch.int32, device=device)
    starts = [0, *itertools.accumulate(lengths)]
    metadata = AttentionMetadata(
        num_tokens=num_tokens,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
        block_tables=tables, slot_mapping=slots, max_query_len=max(lengths), max_seq_len=max(lengths),
        query_lens_cpu=list(lengths), seq_lens_cpu=list(lengths))
    hidden = model(torch.zeros(num_tokens, dtype=torch.long, device=device), positions, kv_caches, metadata)
    rows = torch.arange(min(max_num_seqs, num_tokens), device=device)
    torch.log_softmax(model.compute_logits(hidden[rows]).float(), dim=-1)
    return sum(cache.numel() * cache.element_size() for cache in kv_caches)
