"""Sampling through the whole engine: seeds, n/best_of, stops, min_tokens, ignore_eos."""

from __future__ import annotations

import torch

from aserve import SamplingParams
from hf_reference import hf_log_softmax, random_prompts
from tiny_models import tiny_model_dir

PROMPT = [10, 20, 30, 40, 50]


def _tokens(llm, prompts, params):
    return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_seeded_request_reproduces_whatever_else_is_in_the_batch(llm_cache):
    llm = llm_cache("llama")
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=24, ignore_eos=True)
    other = SamplingParams(temperature=1.3, max_tokens=30, ignore_eos=True)
    alone = _tokens(llm, [PROMPT], seeded)[0]
    crowd = random_prompts(7, [4, 19, 33])
    mixed = llm.generate(crowd[:2] + [PROMPT] + crowd[2:], [other, other, seeded, other], use_tqdm=False)
    assert [c.token_ids for c in mixed[2].outputs] == alone
    assert _tokens(llm, [PROMPT], seeded)[0] == alone


def test_seed_minus_one_means_no_seed(llm_cache):
    """OpenAI and vLLM read seed -1 as "draw at random": four equal requests then differ, where
    four with one real seed agree."""
    assert SamplingParams(seed=-1).seed is None
    llm = llm_cache("llama")

    def four(seed):
        params = SamplingParams(temperature=1.5, seed=seed, max_tokens=16, ignore_eos=True)
        return [tuple(c[0]) for c in _tokens(llm, [PROMPT] * 4, params)]
    assert len(set(four(7))) == 1
    assert len(set(four(-1))) > 1


def test_top_k_one_equals_greedy(llm_cache):
    llm = llm_cache("llama")
    prompts = random_prompts(8, [6, 14])
    greedy = _tokens(llm, prompts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    top1 = _tokens(llm, prompts, SamplingParams(temperature=0.9, top_k=1, max_tokens=20, ignore_eos=True))
    assert top1 == greedy


def test_first_token_distribution_matches_softmax_at_temperature(llm_cache):
    """2000 seeded single-token samples: total-variation distance to softmax(logits / T) < 0.06.

    With 2000 draws the expected TV distance of an exact sampler over this model's support is
    about 0.02-0.03; 0.06 leaves room for chance while catching a wrong temperature.
    """
    llm = llm_cache("llama")
    temperature = 0.7
    draws = 2000
    params = [SamplingParams(temperature=temperature, seed=s, max_tokens=1, ignore_eos=True) for s in range(draws)]
    outputs = llm.generate([PROMPT] * draws, params, use_tqdm=False)
    counts = torch.zeros(512)
    for o in outputs:
        counts[o.outputs[0].token_ids[0]] += 1
    expected = torch.softmax(hf_log_softmax(tiny_model_dir("llama"), PROMPT)[-1] / temperature, dim=-1)
    tv = 0.5 * (counts / draws - expected).abs().sum().item()
    assert tv < 0.06


def test_n_samples_share_the_prompt_and_best_of_keeps_the_most_likely(llm_cache):
    llm = llm_cache("llama")
    out = llm.generate([PROMPT], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    best = llm.generate([PROMPT], SamplingParams(n=2, best_of=5, temperature=1.0, seed=5, max_tokens=6,
                                                 ignore_eos=True), use_tqdm=False)[0]
    scores = [c.cumulative_logprob for c in best.outputs]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert llm.engine.block_manager.num_used_blocks == 0


def test_stop_token_ids_and_eos(llm_cache):
    llm = llm_cache("llama")
    free = _tokens(llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0][0]
    stop_token = free[5]
    first = free.index(stop_token)
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_token]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_token
    length = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    assert length.finish_reason == "length" and length.stop_reason is None


def test_min_tokens_defers_stop_token(llm_cache):
    llm = llm_cache("llama")
    free = _tokens(llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0][0]
    stop_token = free[0]
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=10, min_tokens=4,
                                                stop_token_ids=[stop_token]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 4
    assert stop_token not in out.token_ids[:4]


def test_stop_string_is_cut_unless_included(llm_cache):
    llm = llm_cache("llama")
    base = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "the tiny model must produce text for this test"
    cut = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[:text.index(stop)]
    kept = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop],
                                                 include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:text.index(stop) + len(stop)]


def test_ignore_eos_runs_to_max_tokens_through_eos(llm_cache):
    llm = llm_cache("llama")
    eos = llm.get_tokenizer().eos_token_id
    bias = {eos: 100.0}   # makes EOS the certain next token
    stopped = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, logit_bias=bias),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == [eos] and stopped.finish_reason == "stop"
    ignored = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, logit_bias=bias,
                                                    ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == [eos] * 8 and ignored.finish_reason == "length"


def test_penalties_change_the_output(llm_cache):
    llm = llm_cache("llama")
    plain = _tokens(llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0][0]
    penalised = _tokens(llm, [PROMPT], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                                      frequency_penalty=2.0, presence_penalty=2.0))[0][0]
    assert plain != penalised
    # A strong frequency penalty discourages repeats: fewer repeated tokens than plain greedy.
    assert len(set(penalised)) >= len(set(plain))
