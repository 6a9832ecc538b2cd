"""vLLM's return_token_ids: the prompt's ids and each choice's output ids beside the text
(RL frameworks read them), streamed or not, on completions and chat; the same ids as OfflineLLM."""

from __future__ import annotations

import pytest

from aserve import OfflineLLM, SamplingParams
from server_fixtures import TEST_NUM_BLOCKS, module_server_and_client

server, client = module_server_and_client()

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Hello there!"}]
IDS = {"return_token_ids": True}


@pytest.fixture(scope="module")
def offline():
    return OfflineLLM(model=None, num_gpu_blocks_override=TEST_NUM_BLOCKS, device="cpu")


def greedy(offline, prompt, max_tokens):
    return offline.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)[0]


def chat_ids(offline) -> list[int]:
    tok = offline.get_tokenizer()
    return tok(tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False).input_ids


def test_completions_return_the_ids(client, offline):
    expected = greedy(offline, PROMPT, 8)
    resp = client.completions.create(model="", prompt=PROMPT, max_tokens=8, temperature=0, extra_body=IDS)
    choice = resp.choices[0].model_extra
    assert choice["prompt_token_ids"] == expected.prompt_token_ids
    assert choice["token_ids"] == expected.outputs[0].token_ids
    plain = client.completions.create(model="", prompt=PROMPT, max_tokens=2)
    assert plain.choices[0].model_extra["token_ids"] is None   # only when asked; null otherwise, as vLLM


def test_streamed_completions_send_the_new_ids_in_each_chunk(client, offline):
    expected = greedy(offline, PROMPT, 8)
    chunks = [c for c in client.completions.create(model="", prompt=PROMPT, max_tokens=8, temperature=0,
                                                   stream=True, extra_body=IDS) if c.choices]
    extras = [c.choices[0].model_extra for c in chunks]
    assert extras[0]["prompt_token_ids"] == expected.prompt_token_ids
    assert all("prompt_token_ids" not in e for e in extras[1:])
    assert [t for e in extras for t in e["token_ids"]] == expected.outputs[0].token_ids


def test_chat_returns_the_ids_streamed_or_not(client, offline):
    ids = chat_ids(offline)
    expected = greedy(offline, ids, 6).outputs[0].token_ids
    resp = client.chat.completions.create(model="", messages=MESSAGES, max_tokens=6, temperature=0, extra_body=IDS)
    assert resp.model_extra["prompt_token_ids"] == ids
    assert resp.choices[0].model_extra["token_ids"] == expected
    chunks = list(client.chat.completions.create(model="", messages=MESSAGES, max_tokens=6, temperature=0,
                                                 stream=True, extra_body=IDS))
    assert chunks[0].model_extra["prompt_token_ids"] == ids
    streamed = [t for c in chunks[1:] if c.choices for t in c.choices[0].model_extra.get("token_ids", [])]
    assert streamed == expected
