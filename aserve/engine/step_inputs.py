"""A scheduled step's inputs, planned on the host (rank 0, the engine's thread).

Per-sequence Python only gathers what numpy cannot reach (token ids, block-table lists); the
per-token arrays are built vectorised: at 256 running decodes these loops were a visible
share of the host's step time, which bounds the small model's throughput. Small decode steps
are the exception: there numpy's fixed cost per call dominates, and plain lists are cheaper.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from aserve.engine.block_manager import BlockManager
from aserve.engine.scheduler import SchedulerOutput
from aserve.worker.step_arrays import StepArrays

if TYPE_CHECKING:
    from aserve.worker.model_runner import RowPlan


# Decode steps of at most this many sequences are built in plain Python lists: below it the
# ~25 numpy calls of the general path cost more than the per-sequence work they save (a lone
# sequence's step: 81-125 us against 13-21 us on the 2-core VM), and a lone sequence's decode
# (A1) is bound by the host.
SMALL_DECODE_BATCH = 16


def build_step_arrays(sched: SchedulerOutput, row_plan: "RowPlan", block_manager: BlockManager,
                      placeholder_rows: Optional[dict[int, int]] = None) -> StepArrays:
    """placeholder_rows (async scheduling): for sequences whose last token is still being
    sampled, its row among the previous step's sampled ids."""
    if sched.decode_only:
        if len(sched.scheduled) <= SMALL_DECODE_BATCH:
            return small_decode_arrays(sched, row_plan, block_manager, placeholder_rows)
        return decode_step_arrays(sched, row_plan, block_manager, placeholder_rows)
    return vectorized_step_arrays(sched, row_plan, block_manager, placeholder_rows)


def small_decode_arrays(sched: SchedulerOutput, row_plan: "RowPlan", block_manager: BlockManager,
                        placeholder_rows: Optional[dict[int, int]] = None) -> StepArrays:
    """build_step_arrays of a decode-only step (one token per sequence), in plain Python: the
    same arrays, made with one numpy call per dtype."""
    scheduled = sched.scheduled
    block_size = block_manager.block_size
    tables = [block_manager.block_table(item.seq.seq_id) for item in scheduled]
    width = max(map(len, tables))
    input_ids, positions, slots, seq_lens, flat_tables = [], [], [], [], []
    fill_index: list[int] = []
    fill_rows: list[int] = []
    for i, (item, table) in enumerate(zip(scheduled, tables)):
        seq, position = item.seq, item.start
        input_ids.append(seq.token_ids[position])
        positions.append(position)
        slots.append(table[position // block_size] * block_size + position % block_size)
        seq_lens.append(position + 1)
        flat_tables += table
        flat_tables += [0] * (width - len(table))
        if placeholder_rows:
            row = placeholder_rows.get(seq.seq_id)
            if row is not None and position + 1 == len(seq.token_ids):
                fill_index.append(i)   # the sequence's last token: a placeholder
                fill_rows.append(row)
    logits_indices = list(row_plan.logits_indices)
    copies = [v for pair in sched.block_copies for v in pair]
    num = len(scheduled)
    int64 = np.array(input_ids + positions + slots + logits_indices + fill_index + fill_rows + copies,
                     dtype=np.int64)
    int32 = np.array(list(range(num + 1)) + seq_lens + flat_tables, dtype=np.int32)
    return StepArrays(int64, int32, num, num, width, len(logits_indices), len(fill_index),
                      len(sched.block_copies), 1, max(seq_lens))


def decode_step_arrays(sched: SchedulerOutput, row_plan: "RowPlan", block_manager: BlockManager,
                       placeholder_rows: Optional[dict[int, int]] = None) -> StepArrays:
    """build_step_arrays of a decode-only step of many sequences: one Python pass over them for
    what numpy cannot reach (each one's position, token, block-table row and placeholder), numpy
    for the rest. The general path makes five passes for the same, one per array."""
    scheduled = sched.scheduled
    block_size = block_manager.block_size
    row_of = block_manager.table_array.row_of
    placeholder_of = placeholder_rows.get if placeholder_rows else None
    starts, input_ids, table_rows = [], [], []
    fill_index: list[int] = []
    fill_rows: list[int] = []
    for i, item in enumerate(scheduled):
        seq, start = item.seq, item.start
        token_ids = seq.token_ids
        starts.append(start)
        input_ids.append(token_ids[start])
        table_rows.append(row_of(seq.seq_id))
        if placeholder_of is not None:
            row = placeholder_of(seq.seq_id)
            if row is not None and start + 1 == len(token_ids):
                fill_index.append(i)   # the sequence's last token: a placeholder
                fill_rows.append(row)
    positions = np.array(starts, dtype=np.int64)
    block_tables = block_manager.table_array.gather_rows(np.array(table_rows, dtype=np.int64))
    slots = (block_tables[np.arange(len(scheduled)), positions // block_size].astype(np.int64) * block_size
             + positions % block_size)
    seq_lens = positions + 1
    return StepArrays.build(
        np.array(input_ids, dtype=np.int64), positions, slots,
        np.array(row_plan.logits_indices, dtype=np.int64), np.array(fill_index, dtype=np.int64),
        np.array(fill_rows, dtype=np.int64), np.array(sched.block_copies, dtype=np.int64).reshape(-1, 2),
        np.arange(len(scheduled) + 1, dtype=np.int32), seq_lens.astype(np.int32), block_tables, 1,
        int(seq_lens.max()))


def vectorized_step_arrays(sched: SchedulerOutput, row_plan: "RowPlan", block_manager: BlockManager,
                           placeholder_rows: Optional[dict[int, int]] = None) -> StepArrays:
    """build_step_arrays for any step: per-token arrays built with numpy."""
    scheduled = sched.scheduled
    block_size = block_manager.block_size
    starts = np.fromiter((item.start for item in scheduled), dtype=np.int64, count=len(scheduled))
    counts = np.fromiter((item.num_new_tokens for item in scheduled), dtype=np.int64, count=len(scheduled))
    ends = starts + counts
    query_start = np.zeros(len(scheduled) + 1, dtype=np.int32)
    np.cumsum(counts, out=query_start[1:])     # each sequence's first token in the step
    max_query_len = int(counts.max())
    if max_query_len == 1:         # decode steps: one token per sequence
        input_ids = [item.seq.token_ids[item.start] for item in scheduled]
    else:
        input_ids = [t for item in scheduled
                     for t in item.seq.token_ids[item.start:item.start + item.num_new_tokens]]
    fill_index: list[int] = []
    fill_rows: list[int] = []
    if placeholder_rows:
        next_start = query_start[1:].tolist()
        seq_lens = ends.tolist()
        for i, item in enumerate(scheduled):
            row = placeholder_rows.get(item.seq.seq_id)
            if row is not None and seq_lens[i] == len(item.seq.token_ids):
                fill_index.append(next_start[i] - 1)   # the sequence's last token: a placeholder
                fill_rows.append(row)
    block_tables = block_manager.table_array.gather((item.seq.seq_id for item in scheduled), len(scheduled))
    if max_query_len == 1:  # decode: token i is sequence i's, at its first uncomputed position
        seq_index = np.arange(len(scheduled))
        positions = starts
    else:  # token t of sequence i sits at position starts[i] + (t - query_start[i])
        seq_index = np.repeat(np.arange(len(scheduled)), counts)
        positions = starts[seq_index] + np.arange(len(seq_index)) - query_start[seq_index]
    # The cache slot of every token from its sequence's block table.
    slots = (block_tables[seq_index, positions // block_size].astype(np.int64) * block_size
             + positions % block_size)
    return StepArrays.build(
        np.array(input_ids, dtype=np.int64), positions, slots,
        np.array(row_plan.logits_indices, dtype=np.int64), np.array(fill_index, dtype=np.int64),
        np.array(fill_rows, dtype=np.int64), np.array(sched.block_copies, dtype=np.int64).reshape(-1, 2),
        query_start, ends.astype(np.int32), block_tables, max_query_len, int(ends.max()))
