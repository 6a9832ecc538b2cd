"""/v1/embeddings with chat `messages` (vLLM's EmbeddingChatRequest) through a real pooling
server on loopback: a conversation is rendered with the model's chat template (no generation
prompt and no BOS by default, as vLLM) and embeds exactly as its rendered token ids sent as
`input` do; add_generation_prompt, continue_final_message, add_special_tokens, a request's own
chat_template with chat_template_kwargs, truncation, batches of conversations and a
conversation sent as `input` each change (or keep) the ids as vLLM's do."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from server_fixtures import ServerThread, small_engine_args

CONVERSATION = [{"role": "system", "content": "You embed."}, {"role": "user", "content": "The sky is blue."}]
OTHER = [{"role": "user", "content": "Embeddings map text to vectors"}]


@pytest.fixture(scope="module")
def server():
    options = {"trust_request_chat_template": True}   # the test of a request's own template needs it
    with ServerThread(small_engine_args(runner="pooling"), state_options=options) as srv:
        yield srv


@pytest.fixture(scope="module")
def tokenizer(server):
    return server.state.tokenizer


def embed(server, **body) -> dict:
    answer = requests.post(server.url + "/v1/embeddings", json={"encoding_format": "float", **body}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def vector_of(server, **body) -> np.ndarray:
    return np.array(embed(server, **body)["data"][0]["embedding"])


def rendered_ids(tokenizer, messages, add_special_tokens=False, template=None, **template_kwargs) -> list[int]:
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **template_kwargs)
    return tokenizer(text, add_special_tokens=add_special_tokens).input_ids


def test_messages_embed_as_their_rendered_token_ids(server, tokenizer):
    ids = rendered_ids(tokenizer, CONVERSATION)
    assert tokenizer.decode(ids) == ("<|im_start|>system\nYou embed.<|im_end|>\n"
                                     "<|im_start|>user\nThe sky is blue.<|im_end|>\n")   # no generation prompt
    answer = embed(server, messages=CONVERSATION)
    assert answer["object"] == "list" and answer["data"][0]["object"] == "embedding"
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] == len(ids)
    by_ids = vector_of(server, input=ids)
    np.testing.assert_allclose(answer["data"][0]["embedding"], by_ids, atol=1e-6)
    assert abs(np.linalg.norm(by_ids) - 1) < 1e-5
    as_text = vector_of(server, input=tokenizer.decode(ids))   # the text adds a BOS: another vector
    assert not np.allclose(as_text, by_ids, atol=1e-3)


def test_add_generation_prompt_appends_the_assistant_turn(server, tokenizer):
    ids = rendered_ids(tokenizer, CONVERSATION, add_generation_prompt=True)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    got = embed(server, messages=CONVERSATION, add_generation_prompt=True)
    assert got["usage"]["prompt_tokens"] == len(ids)
    np.testing.assert_allclose(got["data"][0]["embedding"], vector_of(server, input=ids), atol=1e-6)


def test_continue_final_message_leaves_the_last_turn_open(server, tokenizer):
    ids = rendered_ids(tokenizer, CONVERSATION, continue_final_message=True)
    assert tokenizer.decode(ids).endswith("The sky is blue.")
    got = embed(server, messages=CONVERSATION, continue_final_message=True)
    assert got["usage"]["prompt_tokens"] == len(ids)
    np.testing.assert_allclose(got["data"][0]["embedding"], vector_of(server, input=ids), atol=1e-6)


def test_add_special_tokens_puts_a_bos_before_the_template(server, tokenizer):
    ids = rendered_ids(tokenizer, CONVERSATION, add_special_tokens=True)
    assert ids[0] == tokenizer.bos_token_id and ids[1:] == rendered_ids(tokenizer, CONVERSATION)
    np.testing.assert_allclose(vector_of(server, messages=CONVERSATION, add_special_tokens=True),
                               vector_of(server, input=ids), atol=1e-6)


def test_both_generation_prompt_and_continue_final_message_is_a_400(server):
    answer = requests.post(server.url + "/v1/embeddings", json={
        "messages": CONVERSATION, "add_generation_prompt": True, "continue_final_message": True}, timeout=30)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == ("Cannot set both `continue_final_message` and "
                                                 "`add_generation_prompt` to True.")


def test_a_requests_chat_template_and_its_kwargs_render_the_prompt(server, tokenizer):
    template = "{{ prefix }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    ids = rendered_ids(tokenizer, CONVERSATION, template=template, prefix="query: ")
    assert tokenizer.decode(ids) == "query: [system] You embed.\n[user] The sky is blue.\n"
    got = embed(server, messages=CONVERSATION, chat_template=template, chat_template_kwargs={"prefix": "query: "})
    assert got["usage"]["prompt_tokens"] == len(ids)
    np.testing.assert_allclose(got["data"][0]["embedding"], vector_of(server, input=ids), atol=1e-6)


def test_truncation_keeps_the_rendered_prompts_last_tokens(server, tokenizer):
    ids = rendered_ids(tokenizer, CONVERSATION)
    got = embed(server, messages=CONVERSATION, truncate_prompt_tokens=5)
    assert got["usage"]["prompt_tokens"] == 5
    np.testing.assert_allclose(got["data"][0]["embedding"], vector_of(server, input=ids[-5:]), atol=1e-6)
    first = embed(server, messages=CONVERSATION, truncate_prompt_tokens=5, truncation_side="right")
    np.testing.assert_allclose(first["data"][0]["embedding"], vector_of(server, input=ids[:5]), atol=1e-6)


def test_a_batch_of_conversations_and_a_conversation_as_input(server, tokenizer):
    """vLLM's EmbeddingBatchChatRequest (a list of conversations in `messages`) and its
    EmbeddingChatInputRequest / EmbeddingBatchChatInputRequest (the same in `input`)."""
    expected = [vector_of(server, input=rendered_ids(tokenizer, c)) for c in (CONVERSATION, OTHER)]
    for body in ({"messages": [CONVERSATION, OTHER]}, {"input": [CONVERSATION, OTHER]}):
        got = embed(server, **body)
        assert [d["index"] for d in got["data"]] == [0, 1]
        for d, want in zip(got["data"], expected):
            np.testing.assert_allclose(d["embedding"], want, atol=1e-6)
    np.testing.assert_allclose(vector_of(server, input=CONVERSATION), expected[0], atol=1e-6)
    # A conversation in `input` is never taken for token ids, however truncation asks.
    cut = embed(server, input=CONVERSATION, truncate_prompt_tokens=3)
    assert cut["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "messages": OTHER}, "input"),
    ({}, "input"),
    ({"messages": []}, "messages"),
    ({"messages": [OTHER, []]}, "messages"),
    ({"messages": [{"role": "user"}], "chat_template": "{{ undefined_filter | nope }}"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
])
def test_bad_chat_bodies_are_400s_naming_the_field(server, body, param):
    answer = requests.post(server.url + "/v1/embeddings", json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def test_invocations_takes_a_chat_body_on_a_pooling_model_as_an_embeddings_request(server):
    body = {"messages": CONVERSATION, "encoding_format": "float"}
    routed = requests.post(server.url + "/invocations", json=body, timeout=30)
    assert routed.status_code == 200, routed.text
    assert routed.json()["data"][0]["embedding"] == embed(server, **body)["data"][0]["embedding"]
