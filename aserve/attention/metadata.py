"""AttentionMetadata: how this step's flattened tokens map onto sequences and KV-cache blocks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """One step's batch layout, shared by every attention layer of the model.

    Tokens of all scheduled sequences are flattened into one dimension T. Sequence i owns
    tokens query_start_loc[i]:query_start_loc[i+1]; they are the last query_lens[i] tokens of
    its seq_lens[i] tokens of context (so a decode has query_len 1 and a first prefill chunk
    has query_len == seq_len).
    """

    num_tokens: int
    query_start_loc: torch.Tensor      # [B + 1] int32, on the model's device
    seq_lens: torch.Tensor             # [B] int32: context length after this step
    block_tables: torch.Tensor         # [B, max_blocks_per_seq] int32, padded with 0
    slot_mapping: torch.Tensor         # [T] int64: cache slot (block * block_size + offset) per token
    max_query_len: int
    max_seq_len: int
    # Host copies, so the reference path and launch heuristics never synchronise with the GPU.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # What a backend derives from this layout once per step and reuses in every layer.
    backend_cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_all_decode(self) -> bool:
        return self.max_query_len == 1
