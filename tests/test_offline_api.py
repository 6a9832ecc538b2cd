"""The offline API as a vLLM user writes it: LLM, prompt dicts, chat and beam_search."""

from __future__ import annotations

import pytest

import aserve
from aserve import BeamSearchParams, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return aserve.LLM(kv_cache_memory_gb=0.05)


def _ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_llm_is_vllms_name_for_offline_llm():
    assert aserve.LLM is aserve.OfflineLLM


def test_prompt_dicts_equal_plain_prompts(llm):
    ids = llm.get_tokenizer().encode("Hello there")
    plain = _ids(llm.generate(["Hello there", ids], GREEDY, use_tqdm=False))
    dicts = _ids(llm.generate([{"prompt": "Hello there"}, {"prompt_token_ids": ids}], GREEDY, use_tqdm=False))
    assert plain == dicts
    assert _ids(llm.generate({"prompt": "Hello there"}, GREEDY, use_tqdm=False)) == plain[:1]
    with pytest.raises(ValueError, match="prompt 0"):
        llm.generate([{"prompt": "x", "multi_modal_data": {}}], GREEDY, use_tqdm=False)


def test_chat_renders_the_template_like_the_server(llm):
    tokenizer = llm.get_tokenizer()
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    want = _ids(llm.generate([tokenizer(rendered, add_special_tokens=False).input_ids], GREEDY, use_tqdm=False))
    assert _ids(llm.chat(conversation, GREEDY, use_tqdm=False)) == want
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": "Hi!"}]
    both = llm.chat([conversation, parts], GREEDY, use_tqdm=False)
    assert _ids(both) == want * 2


def test_chat_options(llm):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    out = llm.chat(conversation, GREEDY, add_generation_prompt=False, continue_final_message=True,
                   use_tqdm=False)[0]
    assert out.prompt_token_ids[-1] != llm.get_tokenizer().convert_tokens_to_ids("<|im_end|>")
    custom = llm.chat([{"role": "user", "content": "Hi"}], GREEDY, use_tqdm=False,
                      chat_template="{{ messages[0]['content'] }}!")[0]
    assert llm.get_tokenizer().decode(custom.prompt_token_ids) == "Hi!"
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(conversation, GREEDY, continue_final_message=True, use_tqdm=False)


def test_beam_search_returns_every_beam_with_its_prompt(llm):
    prompt = "The quick brown fox"
    results = llm.beam_search([{"prompt": prompt}], BeamSearchParams(beam_width=3, max_tokens=6))
    sequences = results[0].sequences
    assert len(sequences) == 3
    prompt_ids = llm.get_tokenizer().encode(prompt)
    want = llm.generate([prompt], SamplingParams(use_beam_search=True, best_of=3, n=3, temperature=0.0,
                                                  max_tokens=6), use_tqdm=False)[0]
    assert [s.tokens for s in sequences] == [prompt_ids + c.token_ids for c in want.outputs]
    assert sequences[0].cum_logprob >= sequences[-1].cum_logprob
    assert all(s.text.startswith(prompt) for s in sequences)


def test_logprobs_come_as_vllms_lists_of_dicts(llm):
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    out = llm.generate("Hello there", params, use_tqdm=False)[0]
    # The engine keeps them flat; a script gets vLLM's default types.
    assert type(out.prompt_logprobs) is list and out.prompt_logprobs[0] is None
    assert all(type(p) is dict for p in out.prompt_logprobs[1:])
    sample = out.outputs[0]
    assert type(sample.logprobs) is list and len(sample.logprobs) == 4
    for token_id, position in zip(sample.token_ids, sample.logprobs):
        assert type(position) is dict and token_id in position and len(position) in (2, 3)
        assert position[token_id].rank >= 1 and isinstance(position[token_id].decoded_token, str)


def test_detokenize_false_gives_token_ids_without_text(llm):
    """vLLM's SamplingParams.detokenize: the same tokens (and logprobs) with no text."""
    prompt = "Once upon a time"
    with_text = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1),
                             use_tqdm=False)[0].outputs[0]
    plain = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1,
                                                detokenize=False), use_tqdm=False)[0].outputs[0]
    assert with_text.text and plain.text == ""
    assert plain.token_ids == with_text.token_ids and plain.logprobs == with_text.logprobs
    beams = llm.generate(prompt, SamplingParams(use_beam_search=True, best_of=2, n=2, temperature=0.0, max_tokens=4,
                                                detokenize=False), use_tqdm=False)[0].outputs
    assert [b.text for b in beams] == ["", ""] and all(b.token_ids for b in beams)


def test_detokenize_false_refuses_stop_strings():
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=["."], detokenize=False)
    with pytest.raises(ValueError, match="detokenize must be true or false"):
        SamplingParams(detokenize="no")
    assert SamplingParams(stop_token_ids=[2], detokenize=False).stop_token_ids == [2]
