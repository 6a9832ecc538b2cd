"""Prefix caching in the block manager and the scheduler, driven without a model."""

from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from aserve.config import SchedulerConfig
from aserve.engine.block_manager import BlockManager
from aserve.engine.request import Request, Sequence
from aserve.engine.scheduler import Scheduler
from aserve.sampling_params import SamplingParams


def _request(rid: str, prompt: list[int], best_of: int = 1, prompt_logprobs=None) -> Request:
    params = SamplingParams(n=best_of, temperature=1.0, max_tokens=8, prompt_logprobs=prompt_logprobs)
    return Request(rid, None, list(prompt), params, 0.0, Sequence(list(prompt), None, False), None)


def _computed(bm: BlockManager, seq_id: int, tokens: list[int]) -> None:
    """As the engine does once a step's KV is in the cache: allocate, then register."""
    bm.allocate(seq_id, 0, len(tokens))
    bm.cache_computed_blocks(seq_id, tokens, len(tokens))


def test_a_freed_prompt_is_found_again_up_to_its_last_full_block_before_the_end():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    prompt = list(range(100, 110))              # 2 full blocks + 2 tokens
    _computed(bm, 0, prompt)
    blocks = bm.block_table(0)[:2]
    bm.free(0)
    assert bm.num_free_blocks == 16             # cached blocks are free (evictable)
    assert bm.take_cached_prefix(1, prompt) == 8
    assert bm.block_table(1) == blocks and all(bm.ref_count(b) == 1 for b in blocks)
    assert bm.num_free_blocks == 14             # revived: no longer evictable
    # The same prompt cut at a block boundary: its last block is recomputed for the logits.
    assert bm.take_cached_prefix(2, prompt[:8]) == 4
    # Another prompt sharing only the first block.
    assert bm.take_cached_prefix(3, prompt[:4] + [1, 2, 3, 4, 5]) == 4
    assert bm.take_cached_prefix(4, [7] + prompt[1:]) == 0


def test_a_block_is_found_only_after_the_same_whole_prefix():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    _computed(bm, 0, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.free(0)
    # Same second block, different first block: the chain does not match.
    assert bm.take_cached_prefix(1, [9, 9, 9, 9, 5, 6, 7, 8, 9]) == 0


def test_eviction_takes_the_least_recently_freed_cached_block_and_forgets_it():
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    _computed(bm, 0, [1, 2, 3, 4])      # two blocks
    bm.free(0)
    _computed(bm, 1, [5, 6, 7, 8])      # takes the two never-used blocks
    bm.free(1)
    bm.allocate(2, 0, 2)                # one block: evicts the oldest freed, [3, 4]'s
    assert bm.take_cached_prefix(3, [1, 2, 3, 4, 0]) == 2     # [1, 2] survived
    assert bm.take_cached_prefix(4, [5, 6, 7, 8, 0]) == 4     # the later prompt entirely


def test_a_block_shared_by_forks_is_registered_once_and_copy_on_write_keeps_the_original():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    _computed(bm, 0, [1, 2, 3, 4, 5, 6])
    bm.fork(0, 1)
    assert bm.allocate(1, 6, 1) == [(bm.block_table(0)[1], bm.block_table(1)[1])]
    bm.cache_computed_blocks(1, [1, 2, 3, 4, 5, 6, 9, 9], 8)
    bm.free(0)
    bm.free(1)
    assert bm.take_cached_prefix(2, [1, 2, 3, 4, 5, 6, 9, 9, 0]) == 8
    assert bm.take_cached_prefix(3, [1, 2, 3, 4, 5, 6, 7, 8, 0]) == 4


def test_blocks_of_a_failed_step_are_not_kept_and_reset_forgets_everything():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    _computed(bm, 0, list(range(8)))
    bm.free(0, keep_cached=False)
    assert bm.take_cached_prefix(1, list(range(9))) == 0
    _computed(bm, 2, list(range(20, 28)))
    bm.reset_prefix_cache()
    assert bm.take_cached_prefix(3, list(range(20, 29))) == 0
    bm.cache_computed_blocks(2, list(range(20, 28)), 8)   # a running sequence registers again
    assert bm.take_cached_prefix(4, list(range(20, 29))) == 8


def test_the_scheduler_starts_a_request_past_its_cached_prefix():
    bm = BlockManager(32, 4, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=100), bm)
    system = list(range(50, 62))                       # 3 full blocks
    first = _request("a", system + [1, 2])
    sched.add_request(first)
    item = sched.schedule().scheduled[0]
    item.seq.num_computed_tokens += item.num_new_tokens
    bm.cache_computed_blocks(item.seq.seq_id, item.seq.token_ids, item.seq.num_computed_tokens)
    second = _request("b", system + [3, 4, 5])
    sched.add_request(second)
    out = sched.schedule()
    scheduled = {i.request.request_id: i for i in out.scheduled}
    assert (scheduled["b"].start, scheduled["b"].num_new_tokens) == (12, 3)
    assert second.num_cached_tokens == 12 and first.num_cached_tokens == 0
    assert bm.block_table(second.seqs[0].seq_id)[:3] == bm.block_table(first.seqs[0].seq_id)[:3]
    # prompt_logprobs need every prompt position: no hit for them.
    third = _request("c", system + [6], prompt_logprobs=1)
    sched.add_request(third)
    out = sched.schedule()
    assert [i.start for i in out.scheduled if i.request is third] == [0]
    assert bm.prefix_cache.hit_tokens == 12


def test_a_request_that_does_not_fit_gives_its_cached_blocks_back():
    bm = BlockManager(6, 4, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=100), bm)
    _computed(bm, 99, list(range(8)))
    bm.free(99)
    hog = _request("hog", list(range(100, 116)))       # 4 of the 6 blocks: 2 stay free
    sched.add_request(hog)
    sched.schedule()
    big = _request("big", list(range(8)) + list(range(200, 212)))  # 2 cached + 3 new > 2 free
    sched.add_request(big)
    out = sched.schedule()
    assert big not in [i.request for i in out.scheduled]
    assert big.seqs[0].num_computed_tokens == 0 and not bm.block_table(big.seqs[0].seq_id)
    assert bm.num_free_blocks == 2


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_blocks=st.integers(8, 40), block_size=st.sampled_from([2, 4]),
       budget=st.integers(4, 48))
def test_every_block_is_free_cached_or_referenced_exactly_once(seed, num_blocks, block_size, budget):
    # Prompts drawn from a few shared prefixes, so hits, evictions, forks, preemptions and
    # aborts all mix; the engine's order is followed: schedule, compute, register, sample.
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=6, max_model_len=1000), bm)
    prefixes = [[rng.randrange(5) for _ in range(rng.randint(1, 3 * block_size))] for _ in range(3)]
    live: list[Request] = []
    for step in range(80):
        if rng.random() < 0.35 and len(live) < 8:
            best_of = rng.choice([1, 1, 2])
            limit = max(1, (num_blocks // (best_of + 1) - 2) * block_size)
            prompt = (rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randint(0, 6))])[:limit]
            request = _request(f"r{step}", prompt, best_of)
            live.append(request)
            sched.add_request(request)
        if live and rng.random() < 0.1:
            sched.remove_request(live.pop(rng.randrange(len(live))))   # an abort, in any state
        out = sched.schedule()
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            bm.cache_computed_blocks(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if not item.samples:
                continue
            request = item.request
            targets = [seq]
            if request.needs_fork:
                for _ in range(request.params.best_of - 1):
                    child = seq.fork()
                    bm.fork(seq.seq_id, child.seq_id)
                    request.seqs.append(child)
                targets = request.seqs
            for target in targets:
                target.token_ids.append(rng.randrange(5))
                if target.num_output_tokens >= 4 or rng.random() < 0.1:
                    target.finish_reason = "stop"
                    bm.free(target.seq_id)
            if all(s.is_finished for s in request.seqs) and request in live:
                live.remove(request)
                sched.remove_request(request)
        _check_accounting(bm, live, num_blocks)
    for request in live:
        sched.remove_request(request)
    assert bm.num_free_blocks == num_blocks and all(bm.ref_count(b) == 0 for b in range(num_blocks))


def _check_accounting(bm: BlockManager, live: list[Request], num_blocks: int) -> None:
    holders: dict[int, int] = {}
    for request in live:
        for seq in request.seqs:
            for block in bm.block_table(seq.seq_id):
                holders[block] = holders.get(block, 0) + 1
    for block in range(num_blocks):
        referenced = holders.get(block, 0)
        assert bm.ref_count(block) == referenced, "a reference count disagrees with the tables"
        # Free (cached or not) exactly when nobody holds it: a held block is never handed out.
        assert bm.is_free(block) == (referenced == 0)
