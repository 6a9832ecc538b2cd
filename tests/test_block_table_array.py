"""The block manager's persistent table array (engine/block_table_array.py) always equals its
per-sequence lists, padded with 0, through any mix of allocations, copy-on-write, forks, prefix
hits and frees."""

from __future__ import annotations

import random

import numpy as np
import pytest

from aserve.engine.block_manager import BlockManager


def _padded(tables: list[list[int]]) -> np.ndarray:
    width = max(map(len, tables))
    return np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int32).reshape(len(tables), width)


def _check(bm: BlockManager, seq_ids: list[int]) -> None:
    if not seq_ids:
        return
    got = bm.table_array.gather(iter(seq_ids), len(seq_ids))
    want = _padded([bm.block_table(s) for s in seq_ids])
    assert got.dtype == np.int32 and np.array_equal(got, want)


@pytest.mark.parametrize("caching", [False, True], ids=["plain", "prefix_caching"])
@pytest.mark.parametrize("seed", range(6))
def test_the_array_follows_every_table_change(caching, seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=400, block_size=4, enable_prefix_caching=caching)
    live: dict[int, int] = {}     # seq_id -> tokens it holds room for
    prompts: dict[int, list[int]] = {}
    next_id = 0
    for _ in range(600):
        op = rng.random()
        if op < 0.25 or not live:      # a new sequence, maybe on a cached prefix
            prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 30))]
            seq = next_id
            next_id += 1
            start = bm.take_cached_prefix(seq, prompt)
            if bm.num_blocks_needed(seq, start, len(prompt) - start) > bm.num_free_blocks:
                bm.free(seq)
                continue
            bm.allocate(seq, start, len(prompt) - start)
            bm.cache_computed_blocks(seq, prompt, len(prompt))
            live[seq], prompts[seq] = len(prompt), prompt
        elif op < 0.65:                # a decode step: maybe a new block or a copy-on-write
            seq = rng.choice(list(live))
            if bm.num_blocks_needed(seq, live[seq], 1) <= bm.num_free_blocks:
                bm.allocate(seq, live[seq], 1)
                live[seq] += 1
        elif op < 0.8:                 # a fork (n > 1, beams)
            parent = rng.choice(list(live))
            bm.fork(parent, next_id)
            live[next_id], prompts[next_id] = live[parent], prompts[parent]
            next_id += 1
        else:
            seq = rng.choice(list(live))
            bm.free(seq, keep_cached=rng.random() < 0.8)
            del live[seq]
        ids = list(live)
        rng.shuffle(ids)
        _check(bm, ids[:rng.randrange(len(ids) + 1)])
    assert bm.table_array.table.shape[0] >= len(live)


def test_rows_and_width_grow_and_freed_rows_come_back_zeroed():
    bm = BlockManager(num_blocks=5000, block_size=1)
    for seq in range(100):                      # more sequences than the array's first rows
        bm.allocate(seq, 0, seq % 7 + 1)
    bm.allocate(3, 4, 60)                       # a table wider than the first width
    _check(bm, list(range(100)))
    for seq in range(0, 100, 2):
        bm.free(seq)
    for seq in range(100, 150):                 # reuse the freed rows with shorter tables
        bm.allocate(seq, 0, 1)
    _check(bm, list(range(1, 100, 2)) + list(range(100, 150)))
