"""The official `openai` client against a real server: every call a vLLM user makes works, and
greedy outputs equal OfflineLLM's on the same model and prompt."""

from __future__ import annotations

import openai
import pytest

from aserve import OfflineLLM, SamplingParams
from server_fixtures import TEST_NUM_BLOCKS, module_server_and_client

PROMPT = "The capital of France is"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there!"}]


server, client = module_server_and_client()


@pytest.fixture(scope="module")
def offline():
    return OfflineLLM(model=None, num_gpu_blocks_override=TEST_NUM_BLOCKS, device="cpu")


def offline_greedy(offline, prompt, max_tokens: int):
    return offline.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens),
                            use_tqdm=False)[0].outputs[0]


def chat_prompt_ids(offline, messages) -> list[int]:
    tok = offline.get_tokenizer()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def test_models_list_reports_the_served_model(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.model_name]
    assert models[0].object == "model" and models[0].owned_by and models[0].created > 0
    assert models[0].model_extra["max_model_len"] == server.state.max_model_len
    # vLLM's permission list, which some clients read.
    permission, = models[0].model_extra["permission"]
    assert permission["object"] == "model_permission" and permission["allow_sampling"]
    assert permission["id"].startswith("modelperm-") and not permission["allow_fine_tuning"]


def test_models_retrieve_gives_the_served_model_or_a_404(client, server):
    """OpenAI's GET /v1/models/{model}: the same card as the list; an unknown name (slashes
    and all, as hub names have) is a 404 with OpenAI's error body."""
    card = client.models.retrieve(server.model_name)
    assert card.id == server.model_name and card.object == "model"
    listed = client.models.list().data[0]   # the same card, but for its permission's fresh id
    assert card.model_dump(exclude={"permission"}) == listed.model_dump(exclude={"permission"})
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("org/not-" + server.model_name.strip("/"))
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


def test_greedy_completion_equals_offline(client, server, offline):
    resp = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=12, temperature=0)
    expected = offline_greedy(offline, PROMPT, 12)
    choice = resp.choices[0]
    assert resp.object == "text_completion" and resp.id and resp.model == server.model_name
    assert choice.text == expected.text and choice.finish_reason == expected.finish_reason
    assert resp.usage.completion_tokens == len(expected.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streamed_completion_equals_plain(client, server, offline):
    chunks = list(client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    expected = offline_greedy(offline, PROMPT, 12)
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == expected.text
    assert text_chunks[-1].choices[0].finish_reason == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_n2_returns_two_indexed_choices(client, server):
    resp = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=6, n=2,
                                     temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert resp.usage.completion_tokens == 12


def test_logprobs_come_in_openai_shape(client, server):
    resp = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=5,
                                     temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    n = resp.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 4
        assert logprob == pytest.approx(max(top.values()), abs=1e-4)  # greedy took the best
    assert lp.text_offset == sorted(lp.text_offset)


def test_echo_returns_the_prompt_first(client, server):
    resp = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=4,
                                     temperature=0, echo=True, logprobs=1)
    choice = resp.choices[0]
    assert choice.text.startswith(PROMPT)
    assert choice.logprobs.token_logprobs[0] is None  # the first prompt token has no context
    assert len(choice.logprobs.tokens) == resp.usage.prompt_tokens + resp.usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_n_gives_every_choice_the_prompt_and_its_own_tokens(client, server, stream):
    kwargs = dict(model=server.model_name, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3,
                  n=2, echo=True, logprobs=2, extra_body={"ignore_eos": True})
    if stream:
        by_index: dict = {}
        for chunk in client.completions.create(stream=True, **kwargs):
            for c in chunk.choices:
                lp = by_index.setdefault(c.index, {"tokens": [], "offsets": []})
                lp["tokens"] += c.logprobs.tokens
                lp["offsets"] += c.logprobs.text_offset
        choices = [by_index[0], by_index[1]]
    else:
        resp = client.completions.create(**kwargs)
        choices = [{"tokens": c.logprobs.tokens, "offsets": c.logprobs.text_offset} for c in resp.choices]
    prompt_tokens = len(client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=1,
                                                  echo=True, logprobs=0).choices[0].logprobs.tokens) - 1
    for lp in choices:
        assert len(lp["tokens"]) == prompt_tokens + 5
        assert lp["tokens"][:prompt_tokens] == choices[0]["tokens"][:prompt_tokens]
        text_offsets = [sum(len(t) for t in lp["tokens"][:k]) for k in range(len(lp["tokens"]))]
        assert lp["offsets"] == text_offsets


def test_stop_string_ends_the_text_before_it(client, server, offline):
    full = offline_greedy(offline, PROMPT, 16).text
    assert len(full) >= 8, "the model's greedy text is too short to pick a stop string from"
    stop = full[4:7]
    resp = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=16,
                                     temperature=0, stop=[stop])
    assert resp.choices[0].text == full[:full.index(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_several_prompts_give_choices_in_prompt_order(client, server, offline):
    prompts = [PROMPT, "Once upon a time"]
    resp = client.completions.create(model=server.model_name, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    for prompt, choice in zip(prompts, resp.choices):
        assert choice.text == offline_greedy(offline, prompt, 5).text


def test_token_id_prompt_equals_text_prompt(client, server, offline):
    ids = offline.get_tokenizer()(PROMPT).input_ids
    by_ids = client.completions.create(model=server.model_name, prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_greedy_chat_equals_offline(client, server, offline):
    resp = client.chat.completions.create(model=server.model_name, messages=MESSAGES, max_tokens=10,
                                          temperature=0)
    expected = offline_greedy(offline, chat_prompt_ids(offline, MESSAGES), 10)
    msg = resp.choices[0].message
    assert resp.object == "chat.completion"
    assert msg.role == "assistant" and msg.content == expected.text
    assert resp.choices[0].finish_reason == expected.finish_reason
    assert resp.usage.prompt_tokens == len(chat_prompt_ids(offline, MESSAGES))


def test_streamed_chat_sends_role_then_content(client, server, offline):
    chunks = list(client.chat.completions.create(model=server.model_name, messages=MESSAGES,
                                                 max_tokens=10, temperature=0, stream=True))
    expected = offline_greedy(offline, chat_prompt_ids(offline, MESSAGES), 10)
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_chat_logprobs_list_each_token(client, server):
    resp = client.chat.completions.create(model=server.model_name, messages=MESSAGES, max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
