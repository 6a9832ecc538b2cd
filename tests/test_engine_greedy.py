"""Greedy output is token-identical to transformers, whatever the batching does."""

from __future__ import annotations

import pytest

from aserve import SamplingParams
from hf_reference import hf_greedy, random_prompts
from tiny_models import FAMILIES, tiny_model_dir

MAX_TOKENS = 32
PROMPT_LENGTHS = [3, 17, 40, 9]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _expected(family: str, prompts: list[list[int]]) -> list[list[int]]:
    path = tiny_model_dir(family)
    return [hf_greedy(path, p, MAX_TOKENS) for p in prompts]


def _generated(llm, prompts) -> list[list[int]]:
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_equals_transformers(family, llm_cache):
    prompts = random_prompts(1, PROMPT_LENGTHS)
    assert _generated(llm_cache(family), prompts) == _expected(family, prompts)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_preemption_equals_transformers(family, llm_cache):
    # 4 requests of up to 72 tokens need up to 10 blocks of 8 each; 14 blocks force the
    # scheduler to preempt by recompute.
    llm = llm_cache(family, block_size=8, num_gpu_blocks_override=14)
    prompts = random_prompts(2, PROMPT_LENGTHS)
    before = llm.engine.scheduler.num_preemptions
    assert _generated(llm, prompts) == _expected(family, prompts)
    assert llm.engine.scheduler.num_preemptions > before
    assert llm.engine.block_manager.num_free_blocks == 14


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_chunked_prefill_equals_transformers(family, llm_cache):
    llm = llm_cache(family, max_num_batched_tokens=7)
    prompts = random_prompts(3, PROMPT_LENGTHS)
    assert _generated(llm, prompts) == _expected(family, prompts)


def test_string_prompts_equal_their_token_ids(llm_cache):
    llm = llm_cache("llama")
    tokenizer = llm.get_tokenizer()
    text = ["Hello, my name is", "The capital of France is"]
    by_text = llm.generate(text, GREEDY, use_tqdm=False)
    by_ids = llm.generate([tokenizer.encode(t) for t in text], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in by_text] == [o.outputs[0].token_ids for o in by_ids]
    assert by_text[0].prompt == text[0] and by_ids[0].prompt is None
    assert by_text[1].outputs[0].text == tokenizer.decode(by_text[1].outputs[0].token_ids,
                                                          skip_special_tokens=True)
