"""vLLM's sampling extras on the CPU: allowed_token_ids, bad_words, truncate_prompt_tokens and
logprobs -1 / max_logprobs, in the sampler and through the whole engine."""

from __future__ import annotations

import pytest
import torch

from aserve import SamplingParams
from aserve.worker.sampler import Sampler, SamplingMetadata
from tiny_models import VOCAB_SIZE

V = 8
PROMPT = [10, 20, 30, 40, 50]


def metadata(params, outputs=None):
    n = len(params)
    return SamplingMetadata.build(params, [None] * n, [[] for _ in range(n)], outputs or [[] for _ in range(n)])


def with_bad_words(ids, **kwargs) -> SamplingParams:
    params = SamplingParams(**kwargs)
    params.bad_words_token_ids = ids  # what the engine derives from bad_words
    return params


# ------------------------------------------------------------------ the sampler
def test_allowed_token_ids_are_the_only_ones_ever_sampled():
    torch.manual_seed(0)
    logits = torch.randn(1, V).expand(400, V).contiguous()
    params = [SamplingParams(temperature=1.5, allowed_token_ids=[2, 5])] * 400
    assert set(Sampler()(logits, metadata(params)).sampled_token_ids) == {2, 5}


def test_allowed_token_ids_leave_other_rows_alone():
    logits = torch.tensor([[0.0, 9.0, 1.0, 2.0, 0, 0, 0, 0]] * 2)
    out = Sampler()(logits, metadata([SamplingParams(temperature=0, allowed_token_ids=[3]),
                                      SamplingParams(temperature=0)]))
    assert out.sampled_token_ids == [3, 1]


def test_a_one_token_bad_word_is_never_sampled():
    logits = torch.tensor([[0.0, 9.0, 8.0, 0, 0, 0, 0, 0]])
    out = Sampler()(logits, metadata([with_bad_words([[1]], temperature=0)]))
    assert out.sampled_token_ids == [2]


def test_a_bad_word_s_last_token_is_banned_only_after_its_other_tokens():
    logits = torch.tensor([[0.0, 9.0, 8.0, 0, 0, 0, 0, 0]] * 3)
    params = [with_bad_words([[4, 5, 1]], temperature=0)] * 3
    out = Sampler()(logits, metadata(params, outputs=[[7, 4, 5], [4, 7, 5], [5]]))
    assert out.sampled_token_ids == [2, 1, 1]


def test_logprobs_are_still_those_of_the_raw_distribution_under_a_ban():
    logits = torch.tensor([[0.0, 9.0, 8.0, 0, 0, 0, 0, 0]])
    out = Sampler()(logits, metadata([SamplingParams(temperature=0, allowed_token_ids=[2], logprobs=1)]))
    raw = torch.log_softmax(logits, dim=-1)[0]
    assert out.sampled_token_ids == [2]
    assert out.logprobs[0][2].logprob == pytest.approx(raw[2].item())


@pytest.mark.parametrize("field, value", [
    ("allowed_token_ids", []), ("allowed_token_ids", [-1]), ("bad_words", [""]), ("bad_words", "word"),
    ("truncate_prompt_tokens", 0), ("truncate_prompt_tokens", -2), ("logprobs", -2),
])
def test_bad_values_are_value_errors_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field, value", [("allowed_token_ids", [1]), ("bad_words", ["x"])])
def test_masks_are_refused_with_beam_search_which_would_ignore_them(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(use_beam_search=True, n=2, temperature=0, **{field: value})


# ------------------------------------------------------------------ through the engine
def _greedy(llm, prompt, **kwargs):
    params = SamplingParams(temperature=0.0, ignore_eos=True, **kwargs)
    return llm.generate([prompt], params, use_tqdm=False)[0]


def test_bad_words_never_appear_in_the_output(llm_cache):
    llm = llm_cache("llama")
    free = _greedy(llm, PROMPT, max_tokens=16).outputs[0]
    tokenizer = llm.get_tokenizer()
    word = tokenizer.decode([free.token_ids[2]]).strip()
    assert word, "the tiny model must produce a word for this test"
    banned = _greedy(llm, PROMPT, max_tokens=16, bad_words=[word]).outputs[0]
    for spelling in (word, " " + word):
        ids = tokenizer.encode(spelling, add_special_tokens=False)
        assert all(banned.token_ids[i:i + len(ids)] != ids for i in range(len(banned.token_ids)))
    assert banned.token_ids[:2] == free.token_ids[:2] and banned.token_ids != free.token_ids


def test_allowed_token_ids_through_the_engine(llm_cache):
    out = _greedy(llm_cache("llama"), PROMPT, max_tokens=12, allowed_token_ids=[33, 44]).outputs[0]
    assert set(out.token_ids) <= {33, 44}


def test_truncate_prompt_tokens_keeps_the_prompt_s_end(llm_cache):
    llm = llm_cache("llama")
    long_prompt = list(range(100, 140))
    cut = _greedy(llm, long_prompt, max_tokens=8, truncate_prompt_tokens=5)
    assert cut.prompt_token_ids == long_prompt[-5:]
    assert cut.outputs[0].token_ids == _greedy(llm, long_prompt[-5:], max_tokens=8).outputs[0].token_ids


def test_truncate_prompt_tokens_above_the_context_is_refused(llm_cache):
    llm = llm_cache("llama")
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        _greedy(llm, PROMPT, max_tokens=2, truncate_prompt_tokens=10 ** 6)


def test_logprobs_minus_one_is_the_whole_vocabulary_within_max_logprobs(llm_cache):
    llm = llm_cache("llama", max_logprobs=-1)
    out = _greedy(llm, PROMPT, max_tokens=2, logprobs=-1, prompt_logprobs=-1)
    assert all(len(entry) == VOCAB_SIZE for entry in out.outputs[0].logprobs)
    assert all(len(entry) == VOCAB_SIZE for entry in out.prompt_logprobs[1:])


def test_logprobs_beyond_max_logprobs_are_refused(llm_cache):
    llm = llm_cache("llama")  # the default bound, 20
    with pytest.raises(ValueError, match="max-logprobs"):
        _greedy(llm, PROMPT, max_tokens=2, logprobs=21)
    with pytest.raises(ValueError, match="max-logprobs"):
        _greedy(llm, PROMPT, max_tokens=2, logprobs=-1)
