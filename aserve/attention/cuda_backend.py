"""The CUDA attention backend: aserve's own kernels for the KV cache and for decode, flash
attention (through torch) for prompt tokens.

- New keys and values go into the paged cache with the reshape_and_cache kernel.
- Sequences with one query token (decode) run the split-context paged decode kernel, which
  takes CUDA-graph-stable inputs (device seq_lens, padded block tables).
- Sequences with several query tokens (prompts, prompt chunks) run torch's flash-attention
  varlen kernel with a bottom-right causal mask: a fresh prompt attends to this step's own
  keys/values directly; a chunk with earlier context first gathers its whole context from the
  paged cache. Flash attention has no float32 kernel, so float32 steps with prompt tokens use
  the torch reference (float32 is for exactness tests, not speed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from aserve.attention.metadata import AttentionMetadata
from aserve.attention.torch_ref import paged_attention as reference_paged_attention
from aserve.cuda import ops
from aserve.cuda.host_copy import to_device


@dataclass(frozen=True)
class _StepPlan:
    """How this step's sequences split into decode and prompt work; built once per step."""

    decode_tokens: Optional[torch.Tensor]    # token indices of decode sequences (None: all or none)
    # Where the prompt tokens start when every decode row comes before every prompt row (the
    # scheduler's usual order): both parts are then token ranges, used as views, with no
    # gather or scatter of queries, keys, values and outputs (each ~64 MB a layer at 8k tokens).
    prompt_start: Optional[int]
    decode_seq_lens: torch.Tensor
    decode_block_tables: torch.Tensor
    num_decode: int
    prompt_tokens: Optional[torch.Tensor]    # token indices of prompt sequences (None: all or none)
    num_prompt_seqs: int
    cu_seqlens_q: Optional[torch.Tensor]
    cu_seqlens_k: Optional[torch.Tensor]
    max_q: int
    max_k: int
    fresh_prompts: bool                      # every prompt sequence starts at position 0
    context_slots: Optional[torch.Tensor]    # cache slots of all prompt sequences' contexts


class CudaAttentionBackend:
    name = "cuda"
    fuses_rotary = True  # the rotary kernel may store this step's keys and values (kv_cached)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                sliding_window: Optional[int] = None, kv_cached: bool = False) -> torch.Tensor:
        """kv_cached: this step's keys and values are in the cache already."""
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        if key.dtype != k_cache.dtype:
            key, value = key.to(k_cache.dtype), value.to(k_cache.dtype)
        if not kv_cached:
            ops.reshape_and_cache(key, value, k_cache, v_cache, metadata.slot_mapping)
        if not metadata.is_all_decode and query.dtype == torch.float32:
            return reference_paged_attention(query, kv_cache, metadata, scale, sliding_window)
        if metadata.is_all_decode:  # the common step, and the only one CUDA graphs capture
            out = torch.empty_like(query)
            ops.paged_decode_attention(out, query, k_cache, v_cache, metadata.block_tables,
                                       metadata.seq_lens, scale, metadata.max_seq_len, sliding_window)
            return out
        plan = metadata.backend_cache.get("cuda")
        if plan is None:
            plan = metadata.backend_cache["cuda"] = _plan_step(metadata, k_cache.shape[1])
        if plan.num_prompt_seqs and not plan.num_decode:
            # Prompt tokens only, in order: flash attention's output is the whole output.
            return self._prompts(query, key, value, k_cache, v_cache, plan, scale, sliding_window)
        out = torch.empty_like(query)
        if plan.num_decode and plan.prompt_start is not None:
            ops.paged_decode_attention(out[:plan.prompt_start], query[:plan.prompt_start], k_cache, v_cache,
                                       plan.decode_block_tables, plan.decode_seq_lens, scale,
                                       metadata.max_seq_len, sliding_window)
        elif plan.num_decode:
            q = query if plan.decode_tokens is None else query.index_select(0, plan.decode_tokens)
            decode_out = torch.empty_like(q)
            ops.paged_decode_attention(decode_out, q, k_cache, v_cache, plan.decode_block_tables,
                                       plan.decode_seq_lens, scale, metadata.max_seq_len, sliding_window)
            out.index_copy_(0, plan.decode_tokens, decode_out)
        if plan.num_prompt_seqs:
            result = self._prompts(query, key, value, k_cache, v_cache, plan, scale, sliding_window)
            if plan.prompt_start is not None:
                out[plan.prompt_start:].copy_(result)
            else:
                out.index_copy_(0, plan.prompt_tokens, result)
        return out

    @staticmethod
    def _prompts(query, key, value, k_cache, v_cache, plan: _StepPlan, scale: float,
                 sliding_window: Optional[int]) -> torch.Tensor:
        """Flash attention of the step's prompt tokens, [prompt tokens, heads, head_dim] in
        token order."""
        select, start = plan.prompt_tokens, plan.prompt_start

        def prompt_rows(x: torch.Tensor) -> torch.Tensor:
            if start is not None:
                return x[start:]
            return x if select is None else x.index_select(0, select)

        q = prompt_rows(query)
        if plan.fresh_prompts:  # the context is exactly this step's keys and values
            k, v = prompt_rows(key), prompt_rows(value)
        else:
            num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
            k = k_cache.view(-1, num_kv_heads, head_dim).index_select(0, plan.context_slots)
            v = v_cache.view(-1, num_kv_heads, head_dim).index_select(0, plan.context_slots)
        # Flash attention's causal mask is aligned bottom-right when keys outnumber queries:
        # query i of a chunk sees exactly the context up to its own position.
        window_left = -1 if sliding_window is None else sliding_window - 1
        return torch.ops.aten._flash_attention_forward(
            _unit_stride_heads(q), _unit_stride_heads(k), _unit_stride_heads(v), plan.cu_seqlens_q,
            plan.cu_seqlens_k, plan.max_q, plan.max_k, 0.0, True, False, scale=scale,
            window_size_left=window_left, window_size_right=0 if sliding_window is not None else -1)[0]


def _unit_stride_heads(x: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, head_dim] as flash attention takes it: any token and head strides,
    but each head's values adjacent. The models' q, k and v are views into one fused QKV
    projection (rows three heads' widths apart): taken as they are, with no copy of each (three
    kernels a layer of a prompt step, and ~100 MB a layer of copies at 8k tokens on Llama-8B)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _plan_step(metadata: AttentionMetadata, block_size: int) -> _StepPlan:
    device = metadata.seq_lens.device
    query_lens, seq_lens = metadata.query_lens_cpu, metadata.seq_lens_cpu
    decode = [i for i, q in enumerate(query_lens) if q == 1]
    prompt = [i for i, q in enumerate(query_lens) if q > 1]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)

    def tensor(values, dtype=torch.int64):
        return to_device(values, dtype, device)   # pinned: no wait for the step still running

    mixed = bool(decode) and bool(prompt)
    decode_first = mixed and decode[-1] == len(decode) - 1   # rows 0..D-1 decode, the rest prompts
    gathered = mixed and not decode_first
    decode_tokens = tensor([starts[i] for i in decode]) if gathered else None
    decode_index = tensor(decode) if gathered else None
    prompt_tokens = (tensor([t for i in prompt for t in range(starts[i], starts[i + 1])])
                     if gathered else None)
    q_lens = [query_lens[i] for i in prompt]
    k_lens = [seq_lens[i] for i in prompt]
    fresh = all(q == k for q, k in zip(q_lens, k_lens))
    context_slots = None
    if prompt and not fresh:
        # Slot of every context position of every prompt sequence, from the device block tables.
        rows = tensor(prompt)
        seq_of = torch.repeat_interleave(torch.arange(len(prompt), device=device), tensor(k_lens),
                                         output_size=sum(k_lens))
        cu_k = tensor(_cumsum(k_lens))
        position = torch.arange(sum(k_lens), device=device) - cu_k[seq_of]
        blocks = metadata.block_tables[rows[seq_of], position // block_size].long()
        context_slots = blocks * block_size + position % block_size
    return _StepPlan(
        decode_tokens=decode_tokens, prompt_start=len(decode) if decode_first else None,
        decode_seq_lens=(metadata.seq_lens.index_select(0, decode_index) if gathered
                         else metadata.seq_lens[:len(decode)]),
        decode_block_tables=(metadata.block_tables.index_select(0, decode_index) if gathered
                             else metadata.block_tables[:len(decode)]),
        num_decode=len(decode), prompt_tokens=prompt_tokens, num_prompt_seqs=len(prompt),
        cu_seqlens_q=tensor(_cumsum(q_lens), torch.int32) if prompt else None,
        cu_seqlens_k=tensor(_cumsum(k_lens), torch.int32) if prompt else None,
        max_q=max(q_lens, default=0), max_k=max(k_lens, default=0), fresh_prompts=fresh,
        context_slots=context_slots)


def _cumsum(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out
