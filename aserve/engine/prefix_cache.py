"""Which full KV blocks hold which tokens, so a prompt's known prefix is computed once.

A full block is identified by its content key: (the content id of the block before it, its
block_size token ids), a chain that pins down the whole prefix up to the block's end. Keys
are looked up by exact equality (a dict), so two different prefixes never share a block
whatever their hashes. Each registration hands out a fresh content id, never reused: when a
block is evicted, blocks keyed on its id can no longer be reached, so a stale chain can never
match. (A LoRA adapter or another input that changes a block's KV would join the key.)

Blocks are registered once their keys and values are computed, never before: a block that is
cached holds exactly the KV its key names. Registration is incremental: each sequence records
how many of its blocks are registered and the content id of the last one.
"""

from __future__ import annotations

import itertools

_ROOT = 0   # the content id before a sequence's first block


class PrefixCache:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._block_of: dict[tuple, int] = {}    # content key -> the block that holds it
        self._key_of: dict[int, tuple] = {}      # registered block -> its content key
        self._id_of: dict[int, int] = {}         # registered block -> its content id
        # seq_id -> [blocks of its table registered (or found registered), id of the last one]
        self._progress: dict[int, list[int]] = {}
        self._ids = itertools.count(_ROOT + 1)
        self.query_tokens = 0   # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hit_tokens = 0     # of those, found cached (vLLM's prefix_cache_hits)

    # ------------------------------------------------------------------ lookup
    def longest_prefix(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """The cached blocks holding token_ids' longest cached prefix of whole blocks within
        its first max_tokens tokens (read only)."""
        bs, blocks, parent = self.block_size, [], _ROOT
        for start in range(0, max_tokens - bs + 1, bs):
            block = self._block_of.get((parent, tuple(token_ids[start:start + bs])))
            if block is None:
                break
            blocks.append(block)
            parent = self._id_of[block]
        return blocks

    def count_query(self, num_tokens: int, num_hit: int) -> None:
        self.query_tokens += num_tokens
        self.hit_tokens += num_hit

    # ------------------------------------------------------------------ sequences
    def start(self, seq_id: int, hits: list[int]) -> None:
        """A sequence begins with `hits` (possibly none) as its first, registered blocks."""
        self._progress[seq_id] = [len(hits), self._id_of[hits[-1]] if hits else _ROOT]

    def register(self, seq_id: int, table: list[int], token_ids: list[int], num_computed: int) -> None:
        """Register the sequence's blocks that are full of computed tokens and not yet known.
        A block whose content another block already holds stays unregistered (the chain
        continues through the holder's id)."""
        progress = self._progress.get(seq_id)
        if progress is None:
            progress = self._progress[seq_id] = [0, _ROOT]
        index, parent = progress
        bs = self.block_size
        full = min(num_computed // bs, len(table))
        while index < full:
            key = (parent, tuple(token_ids[index * bs:(index + 1) * bs]))
            holder = self._block_of.get(key)
            if holder is None:
                holder = table[index]
                self._block_of[key] = holder
                self._key_of[holder] = key
                self._id_of[holder] = next(self._ids)
            parent = self._id_of[holder]
            index += 1
        progress[0], progress[1] = index, parent

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares the parent's table, so it shares its registration too."""
        progress = self._progress.get(parent_id)
        if progress is not None:
            self._progress[child_id] = list(progress)

    def drop(self, seq_id: int) -> None:
        self._progress.pop(seq_id, None)

    # ------------------------------------------------------------------ blocks
    def is_cached(self, block: int) -> bool:
        return block in self._key_of

    def evict(self, block: int) -> None:
        """The block is about to hold other tokens: it no longer names its content."""
        key = self._key_of.pop(block, None)
        if key is None:
            return
        del self._id_of[block]
        if self._block_of.get(key) == block:
            del self._block_of[key]

    def reset(self) -> None:
        """Forget every cached block. Running sequences register their computed blocks again
        from their first one at their next step (their KV is still theirs and valid)."""
        self._block_of.clear()
        self._key_of.clear()
        self._id_of.clear()
        for progress in self._progress.values():
            progress[0], progress[1] = 0, _ROOT

    @property
    def num_cached_blocks(self) -> int:
        return len(self._key_of)
