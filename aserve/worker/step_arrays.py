"""A step's model inputs as host arrays: what the device tensors are made of, and, with tensor
parallelism, exactly what crosses to the other ranks each step.

Two flat arrays, one per dtype (so the upload is one copy each), and a few counts that say
where each input lies in them. `pack()` lays the same bytes out as one message (a fixed int64
header, then both arrays) and `unpack()` reads them back as views, with no per-request object
and no pickling: the cost of sending a step is a copy of these bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

# What a message asks of the ranks that receive it (the first header field).
STEP_EXECUTE = 1     # run the step; its logits are gathered (rank 0 samples on the host)
STEP_LAUNCH = 2      # async scheduling: as EXECUTE, then rank 0 broadcasts the sampled ids
STEP_DRY_RUN = 3     # receive and discard (benchmarks time the channel with real steps)
SHUTDOWN = 4         # leave the worker loop

_COUNTS = ("num_tokens", "num_seqs", "table_width", "num_logits", "num_fills", "num_copies",
           "max_query_len", "max_seq_len")
_HEADER = np.dtype(np.int64).itemsize * (2 + len(_COUNTS))   # kind, payload bytes, counts


@dataclass(frozen=True)
class StepArrays:
    """int64: input_ids, positions, slot_mapping [num_tokens each], logits_indices
    [num_logits], fill_index, fill_rows [num_fills each], block copies [num_copies x 2];
    int32: query_start_loc [num_seqs + 1], seq_lens [num_seqs], block_tables
    [num_seqs x table_width]."""

    int64: np.ndarray
    int32: np.ndarray
    num_tokens: int
    num_seqs: int
    table_width: int
    num_logits: int
    num_fills: int
    num_copies: int
    max_query_len: int
    max_seq_len: int

    @staticmethod
    def build(input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray,
              logits_indices: np.ndarray, fill_index: np.ndarray, fill_rows: np.ndarray,
              block_copies: np.ndarray, query_start: np.ndarray, seq_lens: np.ndarray,
              block_tables: np.ndarray, max_query_len: int, max_seq_len: int) -> "StepArrays":
        int64 = np.concatenate([input_ids, positions, slots, logits_indices, fill_index, fill_rows,
                                block_copies.ravel()]).astype(np.int64, copy=False)
        int32 = np.concatenate([query_start, seq_lens, block_tables.ravel()]).astype(np.int32, copy=False)
        return StepArrays(int64, int32, len(input_ids), len(seq_lens), block_tables.shape[1],
                          len(logits_indices), len(fill_index), len(block_copies), max_query_len,
                          max_seq_len)

    # ------------------------------------------------------------------ where each input lies
    # Plain slicing with Python ints: this runs on the host's critical path every step.
    def int64_views(self, values) -> tuple:
        """(input_ids, positions, slot_mapping, logits_indices, fill_index, fill_rows) as
        slices of `values` (this object's int64 array, or its device copy); the fills are
        None in a step without placeholders."""
        t, n, f = self.num_tokens, self.num_logits, self.num_fills
        a = 3 * t + n
        fills = (values[a:a + f], values[a + f:a + 2 * f]) if f else (None, None)
        return (values[:t], values[t:2 * t], values[2 * t:3 * t], values[3 * t:a], *fills)

    def int32_views(self, values) -> tuple:
        """(query_start_loc, seq_lens, block_tables 2-D) as slices of `values`."""
        b, w = self.num_seqs, self.table_width
        return values[:b + 1], values[b + 1:2 * b + 1], values[2 * b + 1:2 * b + 1 + b * w].reshape(b, w)

    def block_copies(self) -> list[tuple[int, int]]:
        start = 3 * self.num_tokens + self.num_logits + 2 * self.num_fills
        pairs = self.int64[start:start + 2 * self.num_copies].reshape(-1, 2)
        return [(int(s), int(d)) for s, d in pairs]

    # ------------------------------------------------------------------ the message
    def pack(self, kind: int) -> list[memoryview]:
        """The message as buffers to write one after another (header, int64, int32)."""
        payload = self.int64.nbytes + self.int32.nbytes
        header = np.array([kind, payload] + [getattr(self, c) for c in _COUNTS], dtype=np.int64)
        return [memoryview(header).cast("B"), memoryview(np.ascontiguousarray(self.int64)).cast("B"),
                memoryview(np.ascontiguousarray(self.int32)).cast("B")]

    @staticmethod
    def unpack(message: np.ndarray) -> tuple[int, Optional["StepArrays"]]:
        """(kind, arrays) of a message from pack() (a uint8 array); arrays are views of it,
        None for a message that carries no step."""
        header = message[:_HEADER].view(np.int64)
        kind = int(header[0])
        if kind == SHUTDOWN:
            return kind, None
        counts = dict(zip(_COUNTS, (int(v) for v in header[2:])))
        num_int64 = 3 * counts["num_tokens"] + counts["num_logits"] + 2 * counts["num_fills"] \
            + 2 * counts["num_copies"]
        start = _HEADER
        int64 = message[start:start + 8 * num_int64].view(np.int64)
        int32 = message[start + 8 * num_int64:_HEADER + int(header[1])].view(np.int32)
        return kind, StepArrays(int64, int32, **counts)


def control_message(kind: int) -> list[memoryview]:
    """A message that carries no step (SHUTDOWN)."""
    return [memoryview(np.array([kind, 0] + [0] * len(_COUNTS), dtype=np.int64)).cast("B")]
