"""Bad input gets a clear ValueError naming the problem and harms nothing else."""

from __future__ import annotations

import pytest

from aserve import SamplingParams

BAD_FIELDS = [
    ("n", 0), ("best_of", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("min_p", 1.5), ("presence_penalty", 3.0), ("frequency_penalty", -2.5),
    ("repetition_penalty", 0.0), ("max_tokens", 0), ("min_tokens", -1), ("logprobs", -2),
    # (-1 is the whole vocabulary; counts above max_logprobs are the engine's to refuse, as in
    # vLLM: tests/test_vllm_sampling_extras.py.)
    ("prompt_logprobs", -3), ("seed", "x"), ("stop", [""]), ("stop_token_ids", [-1]),
    ("logit_bias", {"a": 1.0}), ("early_stopping", "sometimes"),
    # Bounds that keep every float in the sampler finite (vLLM's where it has them).
    ("temperature", 2.5), ("temperature", 1e308), ("repetition_penalty", 1e308),
    ("repetition_penalty", 1e-300), ("repetition_penalty", float("nan")), ("length_penalty", float("nan")),
    ("seed", 2**64), ("seed", -(2**63) - 1),
    ("skip_special_tokens", 1), ("ignore_eos", "false"), ("use_beam_search", "false"),
    ("stop", ["x"] * 33), ("stop", ["x" * 257]),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_each_invalid_sampling_field_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_vllm_bounds_are_accepted_at_their_edges():
    SamplingParams(temperature=2.0, repetition_penalty=100.0, seed=(1 << 63) - 1,
                   stop=["s" * 256] * 32)
    SamplingParams(use_beam_search=True, best_of=2, temperature=0.0, length_penalty=1e308)


def test_token_ids_outside_the_vocabulary_are_refused_by_name(llm_cache):
    llm = llm_cache("llama")
    vocab = llm.engine.model_config.vocab_size
    for params, name in [(SamplingParams(stop_token_ids=[2**64 - 1]), "stop_token_ids"),
                         (SamplingParams(logit_bias={vocab: 5.0}), "logit_bias")]:
        with pytest.raises(ValueError, match=f"{name} holds .*{vocab - 1}"):
            llm.generate([[5, 6]], params, use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()
    SamplingParams(stop_token_ids=[vocab - 1], logit_bias={vocab - 1: 1.0})  # the last id is fine


def test_cross_field_rules():
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)
    # Greedy sampling makes one sequence: the field the caller set is named, as vLLM names n.
    with pytest.raises(ValueError, match="^n must be 1 when using greedy sampling.*got 2"):
        SamplingParams(temperature=0.0, n=2)
    with pytest.raises(ValueError, match="^best_of must be 1 when using greedy sampling.*got 3"):
        SamplingParams(temperature=0.0, n=1, best_of=3)


def test_bad_prompts_raise_and_the_rest_of_the_call_is_unaffected(llm_cache):
    llm = llm_cache("llama")
    good = [[5, 6, 7], [8, 9, 10, 11]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(good, params, use_tqdm=False)]
    max_len = llm.engine.model_config.max_model_len
    for bad, words in [("", "empty"), ([], "non-empty"), ([1] * max_len, "maximum context length"),
                       ([99999], "token ids")]:
        with pytest.raises(ValueError, match=words):
            llm.generate([good[0], bad, good[1]], params, use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()
        assert llm.engine.block_manager.num_used_blocks == 0
    again = [o.outputs[0].token_ids for o in llm.generate(good, params, use_tqdm=False)]
    assert again == expected


def test_prompt_plus_max_tokens_over_the_context_gives_both_numbers(llm_cache):
    llm = llm_cache("llama")
    max_len = llm.engine.model_config.max_model_len
    with pytest.raises(ValueError, match=f"maximum context length is {max_len}.*10 in the prompt"):
        llm.generate([[5] * 10], SamplingParams(max_tokens=max_len), use_tqdm=False)


def test_a_request_larger_than_the_cache_is_rejected_with_numbers(llm_cache):
    llm = llm_cache("llama", block_size=8, num_gpu_blocks_override=4)
    with pytest.raises(ValueError, match="KV cache blocks"):
        llm.generate([[5] * 30], SamplingParams(max_tokens=10), use_tqdm=False)
