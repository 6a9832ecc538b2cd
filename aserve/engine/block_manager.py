"""BlockManager: the owner of the paged KV cache's blocks and of every sequence's block table.

A block holds the keys and values of block_size consecutive tokens of one sequence. Blocks
are reference counted: forked sequences (the n samples or beams of one prompt) share the
prompt's blocks, and the first write into a shared block copies it first (copy-on-write).

With prefix caching, a full block keeps its content key (engine/prefix_cache.py) after its
last owner frees it: it sits in the free queue, evictable, until a new request whose prompt
starts with the same tokens takes it back (a hit) or an allocation needs it (then it is
evicted, least recently freed first). Without prefix caching freed blocks are reused newest
first, which keeps the working set warm.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from aserve.engine.block_table_array import BlockTableArray
from aserve.engine.prefix_cache import PrefixCache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache must hold at least one block, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Free blocks in the order they were freed (oldest first); cached ones among them.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks - 1, -1, -1))
        self._ref_counts = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        # The same tables as rows of one array, changed wherever a list changes below.
        self.table_array = BlockTableArray()
        self.prefix_cache: Optional[PrefixCache] = PrefixCache(block_size) if enable_prefix_caching else None

    # ---------------------------------------------------------------- observation
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: the unused ones and the evictable cached ones."""
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

    def is_free(self, block: int) -> bool:
        return block in self._free

    def has_own_slot(self, seq_id: int, position: int) -> bool:
        """Whether the sequence can write token `position` with no new block and no copy."""
        table = self._tables.get(seq_id)
        return (table is not None and position < len(table) * self.block_size
                and self._ref_counts[table[position // self.block_size]] == 1)

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
        table = self._tables.get(seq_id)
        if table is None:
            table = self._tables[seq_id] = []
            self.table_array.set(seq_id, table)
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
                    self.table_array.replace(seq_id, index, dst)
                    copies.append((src, dst))
        if len(table) < end_block:
            new = [self._take() for _ in range(end_block - len(table))]
            table += new
            self.table_array.extend(seq_id, new)
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
        # With caching the least recently freed block goes first (a cached prefix freed long
        # ago is the least likely to be asked for again); without, the most recent.
        block, _ = self._free.popitem(last=self.prefix_cache is None)
        assert self._ref_counts[block] == 0, "a free block must have no owner"
        if self.prefix_cache is not None:
            self.prefix_cache.evict(block)
        self._ref_counts[block] = 1
        return block

    # ---------------------------------------------------------------- prefix caching
    def take_cached_prefix(self, seq_id: int, token_ids: list[int]) -> int:
        """Give a sequence that has no blocks yet the cached blocks of its longest cached
        prefix; returns how many tokens they hold. The last token is always left to compute,
        so the step that computes it has logits to sample from."""
        cache = self.prefix_cache
        if cache is None:
            return 0
        hits = cache.longest_prefix(token_ids, len(token_ids) - 1)
        cache.count_query(len(token_ids), len(hits) * self.block_size)
        for block in hits:
            if self._ref_counts[block] == 0:
                del self._free[block]   # revived: no longer evictable
            self._ref_counts[block] += 1
        self._tables[seq_id] = list(hits)
        self.table_array.set(seq_id, hits)
        cache.start(seq_id, hits)
        return len(hits) * self.block_size

    def cache_computed_blocks(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """The sequence's first num_computed tokens have their KV in the cache now."""
        if self.prefix_cache is not None:
            self.prefix_cache.register(seq_id, self._tables.get(seq_id, []), token_ids, num_computed)

    def reset_prefix_cache(self) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.reset()

    # ---------------------------------------------------------------- sharing and release
    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent."""
        table = self._tables.get(parent_id, [])
        for block in table:
            self._ref_counts[block] += 1
        self._tables[child_id] = list(table)
        self.table_array.set(child_id, table)
        if self.prefix_cache is not None:
            self.prefix_cache.fork(parent_id, child_id)

    def free(self, seq_id: int, keep_cached: bool = True) -> None:
        """Release the sequence's blocks; a block returns to the pool when no one holds it.
        keep_cached=False also forgets the content of the blocks it frees (their KV may be
        wrong: a step that failed)."""
        table = self._tables.pop(seq_id, ())
        self.table_array.drop(seq_id)
        cache = self.prefix_cache
        if cache is not None:
            cache.drop(seq_id)
        # The last blocks first: a sequence's tail is the least shared part of its prefix, so
        # it should be the first of its blocks to be evicted.
        for block in reversed(table):
            count = self._ref_counts[block] - 1
            assert count >= 0, "reference counts never go negative"
            self._ref_counts[block] = count
            if count == 0:
                if cache is not None and not keep_cached:
                    cache.evict(block)
                self._free[block] = None
