"""Block manager and scheduler invariants, driven without a model."""

from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from aserve.config import SchedulerConfig
from aserve.engine.block_manager import BlockManager
from aserve.engine.request import Request, RequestStatus, Sequence
from aserve.engine.scheduler import Scheduler
from aserve.sampling_params import SamplingParams


def _request(rid: str, prompt_len: int, best_of: int = 1) -> Request:
    params = SamplingParams(n=best_of, temperature=1.0, max_tokens=8)
    return Request(rid, None, list(range(prompt_len)), params, 0.0, Sequence(list(range(prompt_len)), None, False), None)


def test_fork_shares_blocks_and_copy_on_write_copies_the_partial_one():
    bm = BlockManager(num_blocks=10, block_size=4)
    bm.allocate(0, 0, 6)                       # 2 blocks, the second half full
    bm.fork(0, 1)
    assert bm.block_table(0) == bm.block_table(1)
    assert all(bm.ref_count(b) == 2 for b in bm.block_table(0))
    assert bm.num_blocks_needed(1, 6, 1) == 1  # the shared partial block must be copied
    copies = bm.allocate(1, 6, 1)
    assert copies == [(bm.block_table(0)[1], bm.block_table(1)[1])]
    assert bm.block_table(0)[0] == bm.block_table(1)[0]   # the full block stays shared
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks == 10


def test_scheduler_chunks_a_long_prompt_under_the_token_budget():
    bm = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=10, max_num_seqs=8, max_model_len=100), bm)
    sched.add_request(_request("a", 25))
    grants = []
    for _ in range(3):
        out = sched.schedule()
        item = out.scheduled[0]
        grants.append((item.num_new_tokens, item.samples))
        item.seq.num_computed_tokens += item.num_new_tokens
    assert grants == [(10, False), (10, False), (5, True)]


def test_new_prompts_join_while_others_decode():
    bm = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8, max_model_len=100), bm)
    first = _request("a", 5)
    sched.add_request(first)
    out = sched.schedule()
    first.seqs[0].num_computed_tokens = 5
    first.seqs[0].token_ids.append(7)
    sched.add_request(_request("b", 30))
    out = sched.schedule()
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 15)]


def test_admission_counts_each_best_of_sample_against_max_num_seqs():
    """A best_of request takes best_of of max_num_seqs' sequences."""
    bm = BlockManager(256, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=1000, max_num_seqs=4, max_model_len=100), bm)
    for rid, best_of in [("a", 2), ("b", 1), ("c", 2), ("d", 1), ("e", 1)]:
        sched.add_request(_request(rid, 3, best_of))
    out = sched.schedule()
    assert [i.request.request_id for i in out.scheduled] == ["a", "b"]   # c would make 5
    for item in out.scheduled:
        item.seq.num_computed_tokens = 3
        item.seq.token_ids.append(9)
    sched.add_request(_request("f", 3))
    out = sched.schedule()
    assert [i.request.request_id for i in out.scheduled] == ["a", "b"]   # one slot free, c needs 2
    sched.running.remove(sched.running[1])   # b leaves: a (2) + c (2) fill all 4
    out = sched.schedule()
    assert [i.request.request_id for i in out.scheduled] == ["a", "c"]
    assert [r.request_id for r in sched.waiting] == ["d", "e", "f"]


def test_a_full_list_of_running_requests_admits_none_of_the_queue():
    bm = BlockManager(256, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=1000, max_num_seqs=2, max_model_len=100), bm)
    for rid in "xyz":
        sched.add_request(_request(rid, 3))
    for _ in range(3):
        out = sched.schedule()
        assert [i.request.request_id for i in out.scheduled] == ["x", "y"]
        for item in out.scheduled:
            item.seq.num_computed_tokens = len(item.seq.token_ids)
            item.seq.token_ids.append(9)
    assert [r.request_id for r in sched.waiting] == ["z"]


def test_preemption_takes_the_latest_arrival_and_requeues_it_first():
    bm = BlockManager(4, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=100), bm)
    old, new = _request("old", 8), _request("new", 8)
    sched.add_request(old)
    sched.add_request(new)
    sched.schedule()
    for r in (old, new):
        r.seqs[0].num_computed_tokens = 8
        r.seqs[0].token_ids.append(1)        # each needs a third block now; only 4 exist
    out = sched.schedule()
    assert out.preempted == [new]
    assert [i.request for i in out.scheduled] == [old]
    assert sched.waiting[0] is new and new.status is RequestStatus.WAITING
    assert new.seqs[0].num_computed_tokens == 0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_blocks=st.integers(8, 40), block_size=st.sampled_from([2, 4, 8]),
       budget=st.integers(4, 48))
def test_every_block_is_free_after_any_mix_of_finished_and_aborted_requests(seed, num_blocks, block_size, budget):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=6, max_model_len=1000), bm)
    live: list[Request] = []
    for step in range(80):
        if rng.random() < 0.3 and len(live) < 8:
            best_of = rng.choice([1, 1, 2, 3])
            # Only requests that fit alone in the cache are admitted (the engine checks this).
            prompt = rng.randint(1, max(1, (num_blocks // (best_of + 1) - 2) * block_size))
            request = _request(f"r{step}", prompt, best_of)
            live.append(request)
            sched.add_request(request)
        if live and rng.random() < 0.1:
            victim = live.pop(rng.randrange(len(live)))
            sched.remove_request(victim)        # an abort, in any state
        out = sched.schedule()
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            if not item.samples:
                continue
            request = item.request
            targets = [seq]
            if request.needs_fork:               # as the engine forks the first sample
                for _ in range(request.params.best_of - 1):
                    child = seq.fork()
                    bm.fork(seq.seq_id, child.seq_id)
                    request.seqs.append(child)
                targets = request.seqs
            for target in targets:
                target.token_ids.append(rng.randrange(100))
                if target.num_output_tokens >= 4 or rng.random() < 0.1:
                    target.finish_reason = "stop"
                    bm.free(target.seq_id)
            if all(s.is_finished for s in request.seqs) and request in live:
                live.remove(request)
                sched.remove_request(request)
        assert all(bm.ref_count(b) >= 0 for b in range(num_blocks))
        assert bm.num_free_blocks + len({b for r in live for s in r.seqs for b in bm.block_table(s.seq_id)}) == num_blocks
    for request in live:
        sched.remove_request(request)
    assert bm.num_free_blocks == num_blocks
    assert all(bm.ref_count(b) == 0 for b in range(num_blocks))


def test_a_decode_token_needs_no_block_only_inside_an_unshared_block():
    bm = BlockManager(10, 4)
    bm.allocate(0, 0, 6)                  # positions 0-5: blocks 0-3 and 4-7
    assert bm.has_own_slot(0, 6) and bm.has_own_slot(0, 7)
    assert not bm.has_own_slot(0, 8)      # the next block does not exist yet
    bm.fork(0, 1)
    assert not bm.has_own_slot(0, 6)      # shared: the write must copy first
    assert not bm.has_own_slot(5, 0)      # no such sequence


def test_decode_steps_reuse_their_row_plan_until_the_batch_changes():
    from aserve.engine.row_planner import RowPlanner

    bm = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=100), bm)
    planner = RowPlanner()
    requests = [_request(f"r{i}", 5) for i in range(3)]
    for r in requests:
        sched.add_request(r)

    def step():
        out = sched.schedule()
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.samples:
                item.seq.token_ids.append(1)
        return out

    first = step()
    assert not first.decode_only          # prompts
    plans = [planner.plan(out) for out in (step(), step())]
    assert plans[0] is plans[1] and plans[0].row_plan.logits_indices == [0, 1, 2]
    sched.remove_request(requests[1])
    out = step()
    assert out.decode_only and planner.plan(out) is not plans[0]
    assert planner.plan(out).row_plan.logits_indices == [0, 1]


def test_a_row_plan_that_reads_output_tokens_is_never_reused():
    from aserve.engine.row_planner import plan_rows

    bm = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=100), bm)
    params = SamplingParams(temperature=1.0, max_tokens=8, repetition_penalty=1.2)
    request = Request("p", None, [1, 2, 3], params, 0.0, Sequence([1, 2, 3], None, False), None)
    sched.add_request(request)
    out = sched.schedule()
    request.seqs[0].num_computed_tokens = 3
    request.seqs[0].token_ids.append(9)
    out = sched.schedule()
    assert out.decode_only and not plan_rows(out).reusable
