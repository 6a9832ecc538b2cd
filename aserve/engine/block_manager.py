"""BlockManager: the owner of the paged KV cache's blocks and of every sequence's block table.

A block holds the keys and values of block_size consecutive tokens of one sequence. Blocks
are reference counted: forked sequences (the n samples or beams of one prompt) share the
prompt's blocks, and the first write into a shared block copies it first (copy-on-write).
"""

from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache must hold at least one block, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: freshly freed blocks are reused first, which keeps the working set warm.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref_counts = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}

    # ---------------------------------------------------------------- observation
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------- allocation
    def num_blocks_needed(self, seq_id: int, num_computed: int, num_new: int) -> int:
        """Free blocks that writing tokens [num_computed, num_computed + num_new) would take."""
        table = self._tables.get(seq_id, ())
        end_block = -(-(num_computed + num_new) // self.block_size)
        needed = end_block - len(table) if end_block > len(table) else 0
        return needed + self._count_shared_written(table, num_computed, end_block)

    def allocate(self, seq_id: int, num_computed: int, num_new: int) -> list[tuple[int, int]]:
        """Give the sequence room for num_new more tokens; returns the (src, dst) block copies
        that copy-on-write needs before the model writes. The caller checked the free count."""
        table = self._tables.setdefault(seq_id, [])
        end_block = -(-(num_computed + num_new) // self.block_size)
        copies = []
        if self._count_shared_written(table, num_computed, end_block):
            ref_counts = self._ref_counts
            for index in range(num_computed // self.block_size, min(len(table), end_block)):
                src = table[index]
                if ref_counts[src] > 1:
                    dst = self._take()
                    ref_counts[src] -= 1
                    table[index] = dst
                    copies.append((src, dst))
        while len(table) < end_block:
            table.append(self._take())
        return copies

    def _count_shared_written(self, table, num_computed: int, end_block: int) -> int:
        """Blocks among those the write touches that others share (they need copying first)."""
        ref_counts = self._ref_counts
        count = 0
        for index in range(num_computed // self.block_size, min(len(table), end_block)):
            if ref_counts[table[index]] > 1:
                count += 1
        return count

    def _take(self) -> int:
        block = self._free.pop()
        assert self._ref_counts[block] == 0, "a free block must have no owner"
        self._ref_counts[block] = 1
        return block

    # ---------------------------------------------------------------- sharing and release
    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent."""
        table = self._tables.get(parent_id, [])
        for block in table:
            self._ref_counts[block] += 1
        self._tables[child_id] = list(table)

    def free(self, seq_id: int) -> None:
        """Release the sequence's blocks; a block returns to the pool when no one holds it."""
        for block in self._tables.pop(seq_id, ()):
            count = self._ref_counts[block] - 1
            assert count >= 0, "reference counts never go negative"
            self._ref_counts[block] = count
            if count == 0:
                self._free.append(block)
