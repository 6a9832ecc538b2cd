"""Prefix caching through the engine: the same tokens and logprobs with the cache on and off
(and as transformers), whichever way a cached prefix is reached."""

from __future__ import annotations

import pytest

from aserve import SamplingParams
from hf_reference import hf_greedy, random_prompts
from tiny_models import FAMILIES, tiny_model_dir

MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
SYSTEM = random_prompts(21, [37])[0]        # 2 full blocks of 16 tokens, and 5 more


def _suffix(seed: int, n: int) -> list[int]:
    return random_prompts(seed, [n])[0]


# A prompt computed first, then prompts that reach its cached blocks in every way, with the
# cached tokens each should find (block size 16; the last token is always computed).
WARM = SYSTEM + _suffix(1, 5)
CASES = [
    (SYSTEM + _suffix(2, 9), 32),            # the shared prefix ends mid-block
    (SYSTEM[:32] + _suffix(3, 7), 32),       # ... and at a block boundary
    (WARM, 32),                              # the whole prompt again
    (SYSTEM[:20], 16),                       # a prompt that is a prefix of another
    (_suffix(4, 30), 0),                     # nothing shared
]


def _ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_cached_prefixes_equals_no_cache_and_transformers(family, llm_cache):
    cached = llm_cache(family, enable_prefix_caching=True)
    cached.engine.reset_prefix_cache()
    plain = llm_cache(family, enable_prefix_caching=False)
    prompts = [p for p, _ in CASES]
    cached.generate([WARM], GREEDY, use_tqdm=False)
    got = cached.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in got] == [n for _, n in CASES]
    assert _ids(got) == _ids(plain.generate(prompts, GREEDY, use_tqdm=False))
    assert _ids(got) == [hf_greedy(tiny_model_dir(family), p, MAX_TOKENS) for p in prompts]
    assert cached.engine.block_manager.num_used_blocks == 0


def test_logprobs_with_a_cached_prefix_equal_no_cache(llm_cache):
    cached, plain = llm_cache("llama", enable_prefix_caching=True), llm_cache("llama", enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, ignore_eos=True)
    cached.generate([WARM], GREEDY, use_tqdm=False)
    prompts = [p for p, _ in CASES[:3]]
    a, b = cached.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False)
    assert all(o.num_cached_tokens == 32 for o in a)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert lx.keys() == ly.keys()
            for token in lx:   # the prefix computed in another chunk: float32 rounding only
                assert abs(lx[token].logprob - ly[token].logprob) <= 1e-5 * max(1.0, abs(lx[token].logprob))


def test_prompt_logprobs_requests_compute_their_whole_prompt(llm_cache):
    llm = llm_cache("llama", enable_prefix_caching=True)
    llm.generate([WARM], GREEDY, use_tqdm=False)
    out = llm.generate([WARM], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1),
                       use_tqdm=False)[0]
    assert out.num_cached_tokens == 0 and len(out.prompt_logprobs) == len(WARM)


def test_chunked_prefill_over_a_cached_prefix(llm_cache):
    llm = llm_cache("llama", enable_prefix_caching=True, max_num_batched_tokens=7)
    llm.generate([WARM], GREEDY, use_tqdm=False)
    prompts = [p for p, _ in CASES]
    got = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in got] == [n for _, n in CASES]
    assert _ids(got) == [hf_greedy(tiny_model_dir("llama"), p, MAX_TOKENS) for p in prompts]


def test_samples_and_beams_share_cached_blocks(llm_cache):
    cached, plain = llm_cache("qwen2", enable_prefix_caching=True), llm_cache("qwen2", enable_prefix_caching=False)
    cached.generate([WARM], GREEDY, use_tqdm=False)
    for params in (SamplingParams(n=3, best_of=3, temperature=1.0, seed=9, max_tokens=8, ignore_eos=True),
                   SamplingParams(use_beam_search=True, best_of=3, n=2, temperature=0.0, max_tokens=8)):
        prompts = [CASES[0][0], CASES[1][0]]
        got = cached.generate(prompts, params, use_tqdm=False)
        assert [o.num_cached_tokens for o in got] == [32, 32]
        want = plain.generate(prompts, params, use_tqdm=False)
        assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]
    assert cached.engine.block_manager.num_used_blocks == 0


def test_preempted_requests_recompute_from_their_cached_prefix(llm_cache):
    # 14 blocks of 8 tokens cannot hold the 4 requests: some are preempted, and their own
    # freed blocks (and the shared prefix) are found again when they come back.
    llm = llm_cache("gpt2", enable_prefix_caching=True, block_size=8, num_gpu_blocks_override=14)
    prompts = [SYSTEM[:17] + _suffix(s, 6) for s in (30, 31, 32, 33)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    before, hits = llm.engine.scheduler.num_preemptions, llm.engine.get_stats().prefix_cache_hits
    got = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > before
    assert llm.engine.get_stats().prefix_cache_hits > hits
    assert _ids(got) == [hf_greedy(tiny_model_dir("gpt2"), p, 24) for p in prompts]
    assert llm.engine.block_manager.num_free_blocks == 14


def test_many_distinct_prefixes_in_a_small_cache_keep_serving_correctly(llm_cache):
    llm = llm_cache("opt", enable_prefix_caching=True, block_size=8, num_gpu_blocks_override=24)
    prefixes = random_prompts(40, [24] * 6)
    for round_ in range(3):   # later rounds hit what eviction left, and evict the rest
        prompts = [p + _suffix(50 + round_ * 10 + i, 3) for i, p in enumerate(prefixes)]
        got = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert _ids(got) == [hf_greedy(tiny_model_dir("opt"), p, MAX_TOKENS) for p in prompts]
    assert llm.engine.get_stats().prefix_cache_hits > 0
    assert llm.engine.block_manager.num_used_blocks == 0


def test_reset_prefix_cache_forgets_cached_prefixes(llm_cache):
    llm = llm_cache("mistral", enable_prefix_caching=True)
    llm.generate([WARM], GREEDY, use_tqdm=False)
    assert llm.reset_prefix_cache()
    assert llm.generate([WARM], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0
