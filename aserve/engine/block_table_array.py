"""Every live sequence's block table as one row of a persistent int32 array.

The block manager owns the tables (Python lists) and mirrors each change here: a whole table
set (a new sequence, a prefix hit, a fork), blocks appended, a block replaced (copy-on-write),
a table dropped. A step then gathers its sequences' tables with one numpy index instead of
converting every list again: at 256 sequences of ~210 tokens that conversion was over half of
the step inputs' build time on the 2-core VM. Entries past a table's length are 0, as the
step inputs' padding is.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


class BlockTableArray:
    def __init__(self, rows: int = 64, width: int = 16) -> None:
        self.table = np.zeros((rows, width), dtype=np.int32)
        self.lens = np.zeros(rows, dtype=np.int64)
        self._row_of: dict[int, int] = {}
        self._free_rows = list(range(rows - 1, -1, -1))

    # ---------------------------------------------------------------- the block manager's side
    def set(self, seq_id: int, blocks: list[int]) -> None:
        """The sequence's whole table (a new one, or one that replaces it)."""
        row = self._row_of.get(seq_id)
        if row is None:
            row = self._row_of[seq_id] = self._take_row()
        self._fit(len(blocks))
        self.table[row, :len(blocks)] = blocks
        self.table[row, len(blocks):self.lens[row]] = 0
        self.lens[row] = len(blocks)

    def extend(self, seq_id: int, blocks: list[int]) -> None:
        """Blocks appended to the end of the sequence's table."""
        row = self._row_of[seq_id]
        start = int(self.lens[row])
        self._fit(start + len(blocks))
        self.table[row, start:start + len(blocks)] = blocks
        self.lens[row] = start + len(blocks)

    def replace(self, seq_id: int, index: int, block: int) -> None:
        self.table[self._row_of[seq_id], index] = block

    def drop(self, seq_id: int) -> None:
        row = self._row_of.pop(seq_id, None)
        if row is not None:
            self.table[row, :self.lens[row]] = 0
            self.lens[row] = 0
            self._free_rows.append(row)

    # ---------------------------------------------------------------- a step's side
    def gather(self, seq_ids: Iterable[int], count: int) -> np.ndarray:
        """The tables of `count` sequences as a [count, longest] int32 array, padded with 0."""
        row_of = self._row_of
        return self.gather_rows(np.fromiter((row_of[s] for s in seq_ids), dtype=np.int64, count=count))

    def row_of(self, seq_id: int) -> int:
        """The sequence's row, for a caller that collects rows in a loop of its own."""
        return self._row_of[seq_id]

    def gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """gather by rows (row_of's): a [len(rows), longest] int32 array, padded with 0."""
        width = int(self.lens[rows].max()) if len(rows) else 0
        return self.table[rows, :width]

    # ---------------------------------------------------------------- room
    def _take_row(self) -> int:
        if not self._free_rows:
            old = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self.lens = np.concatenate([self.lens, np.zeros_like(self.lens)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    def _fit(self, width: int) -> None:
        if width > self.table.shape[1]:
            wider = np.zeros((self.table.shape[0], max(width, 2 * self.table.shape[1])), dtype=np.int32)
            wider[:, :self.table.shape[1]] = self.table
            self.table = wider
