"""engine/row_planner.py: the plain-row fast path plans exactly what the general path plans,
on real scheduler outputs of a real engine (prompt chunks and decode steps, plain requests
beside ones with logprobs, a seed, penalties, best_of, beams and prompt logprobs)."""

from __future__ import annotations

import pytest

from aserve.engine.row_planner import plan_rows
from aserve.sampling_params import SamplingParams
from server_fixtures import small_engine_args


@pytest.fixture(scope="module")
def engine():
    from aserve.engine.engine import Engine
    return Engine(small_engine_args(max_num_batched_tokens=64, async_scheduling=False))


def _plans(sched):
    """plan_rows as it is, and with every request sent down the general path."""
    fast = plan_rows(sched)
    requests = {item.request for item in sched.scheduled}
    saved = {r: r.plain_sampling for r in requests}
    try:
        for r in requests:
            r.plain_sampling = False
        general = plan_rows(sched)
    finally:
        for r, flag in saved.items():
            r.plain_sampling = flag
    return fast, general


def _same(fast, general):
    a, b = fast.row_plan, general.row_plan
    assert (a.logits_indices, a.num_sample_rows, a.num_beam_rows, a.needs_sampled_logprob) == \
           (b.logits_indices, b.num_sample_rows, b.num_beam_rows, b.needs_sampled_logprob)
    assert [(g.num_top, g.target_token_ids) for g in a.prompt_logprob_groups] == \
           [(g.num_top, g.target_token_ids) for g in b.prompt_logprob_groups]
    assert fast.spans == general.spans and fast.reusable == general.reusable
    if a.sampling_metadata is None:
        assert b.sampling_metadata is None
        return
    ma, mb = a.sampling_metadata, b.sampling_metadata
    assert ma.params == mb.params and ma.generators == mb.generators
    assert ma.prompt_token_ids == mb.prompt_token_ids and ma.output_token_ids == mb.output_token_ids
    assert (ma.all_greedy, ma.any_penalties, ma.any_min_tokens, ma.max_num_logprobs, ma.random_rows) == \
           (mb.all_greedy, mb.any_penalties, mb.any_min_tokens, mb.max_num_logprobs, mb.random_rows)


def test_the_plain_row_path_plans_what_the_general_path_plans(engine):
    prompts = [[7 + i] * (5 + 9 * i) for i in range(8)]
    kinds = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
             SamplingParams(temperature=0.7, max_tokens=6, ignore_eos=True),
             SamplingParams(temperature=0.7, seed=3, max_tokens=6, ignore_eos=True, logprobs=2),
             SamplingParams(temperature=0.7, max_tokens=6, ignore_eos=True, presence_penalty=0.5),
             SamplingParams(temperature=0.7, n=2, best_of=3, max_tokens=6, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=1),
             SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, min_tokens=2),
             SamplingParams(use_beam_search=True, best_of=2, temperature=0, max_tokens=6, ignore_eos=True)]
    for i, (prompt, params) in enumerate(zip(prompts, kinds)):
        engine.add_request(f"r{i}", prompt, params)
    plain = {r.request_id: r.plain_sampling for r in engine.requests.values()}
    assert plain == {"r0": True, "r1": True, "r2": True, "r3": False, "r4": False, "r5": False,
                     "r6": False, "r7": False}
    planner, checked = engine.row_planner, []
    original = planner.plan

    def checked_plan(sched):   # every real step's scheduler output, both ways
        _same(*_plans(sched))
        checked.append((sched.decode_only, len(sched.scheduled)))
        return original(sched)

    planner.plan = checked_plan
    try:
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        del planner.plan
    assert any(decode for decode, _ in checked) and any(not decode for decode, _ in checked)
    assert max(rows for _, rows in checked) >= 8
