"""Async scheduling (step k+1 scheduled before step k's tokens reach the host) changes no
output: the same tokens, finish reasons and freed blocks as synchronous steps, through
chunked prefill, preemption, stops, aborts and requests that force synchronous steps."""

from __future__ import annotations

import pytest

from aserve import SamplingParams
from hf_reference import random_prompts

PROMPT_LENGTHS = [3, 17, 40, 9, 1, 26]


def _run(llm, prompts, params):
    return [[(c.token_ids, c.finish_reason) for c in o.outputs]
            for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("settings", [
    {},                                                   # whole prompts
    {"max_num_batched_tokens": 7},                        # chunked prefill
    {"block_size": 8, "num_gpu_blocks_override": 14},     # recompute preemption
])
def test_greedy_tokens_equal_synchronous_steps(family, settings, llm_cache):
    prompts = random_prompts(21, PROMPT_LENGTHS)
    # Different lengths, so requests finish at different steps while others run on.
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (5, 31, 12, 20, 1, 9)]
    if "num_gpu_blocks_override" in settings:
        # 4 requests growing to 35-72 tokens in 14 blocks of 8: running requests must preempt.
        prompts, params = prompts[:4], [SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)] * 4
    sync = llm_cache(family, async_scheduling=False, **settings)
    pipelined = llm_cache(family, async_scheduling=True, **settings)
    engine = pipelined.engine
    preemptions = engine.scheduler.num_preemptions
    assert _run(pipelined, prompts, params) == _run(sync, prompts, params)
    if "num_gpu_blocks_override" in settings:
        assert engine.scheduler.num_preemptions > preemptions, "no preemption was exercised"
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_seeded_sampling_and_stop_tokens_equal_synchronous_steps(llm_cache):
    prompts = random_prompts(22, PROMPT_LENGTHS)
    sync = llm_cache("llama", async_scheduling=False)
    pipelined = llm_cache("llama", async_scheduling=True)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=24,
                             stop_token_ids=[7, 8, 9, 10, 11, 12]) for i in range(len(prompts))]
    expected = _run(sync, prompts, params)
    assert any(reason == "stop" for out in expected for _, reason in out), "no stop was exercised"
    assert _run(pipelined, prompts, params) == expected


def test_requests_that_read_their_history_run_synchronously_and_correctly(llm_cache):
    """A penalised request (its sampling reads its own tokens) among plain ones."""
    prompts = random_prompts(23, [5, 12, 30])
    params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)]
    sync = llm_cache("llama", async_scheduling=False)
    pipelined = llm_cache("llama", async_scheduling=True)
    assert _run(pipelined, prompts, params) == _run(sync, prompts, params)
    assert pipelined.engine.all_requests_pipelinable()   # they left: the next batch pipelines


def test_abort_while_a_step_is_in_flight_frees_the_blocks(llm_cache):
    engine = llm_cache("llama", async_scheduling=True).engine
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(24, [10, 20, 30])):
        engine.add_request(f"abort-{i}", prompt, params)
    for _ in range(4):
        engine.step()
    assert engine.pipeline.in_flight is not None
    engine.abort_request("abort-1")
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == {"abort-0", "abort-2"}
    assert all(len(o.outputs[0].token_ids) == 50 for o in finished.values())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_drain_finishes_the_step_in_flight_and_launches_none(llm_cache):
    engine = llm_cache("llama", async_scheduling=True).engine
    engine.add_request("drain-0", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    engine.step()
    assert engine.pipeline.in_flight is not None
    engine.pipeline.drain()
    assert engine.pipeline.in_flight is None
    seq = engine.requests["drain-0"].seqs[0]
    assert seq.num_computed_tokens == seq.num_tokens - 1    # consistent for a synchronous step
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [len(o.outputs[0].token_ids) for o in finished] == [10]
