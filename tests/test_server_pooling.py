"""POST /pooling (vLLM's Pooling API) through a real pooling server on loopback: for an
embedding model its task is "embed", each prompt's `data` is the vector /v1/embeddings gives
(texts, token ids or chat messages), `object` "pooling"; vLLM's refusals (dimensions, other
tasks, removed tasks, a plugin body) are 400s with its words, and a generating server refuses
the route as it refuses /v1/embeddings. /invocations hands a plugin body (`data`) to it."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from aserve import OfflineLLM
from server_fixtures import ServerThread, small_engine_args

TEXTS = ["The sky is blue.", "Embeddings map text to vectors", "x"]


@pytest.fixture(scope="module")
def server():
    with ServerThread(small_engine_args(runner="pooling")) as srv:
        yield srv


def pooling(server, **body) -> requests.Response:
    return requests.post(server.url + "/pooling", json=body, timeout=60)


def embeddings(server, **body) -> list[np.ndarray]:
    answer = requests.post(server.url + "/v1/embeddings", json={"encoding_format": "float", **body}, timeout=60)
    assert answer.status_code == 200, answer.text
    return [np.array(d["embedding"]) for d in answer.json()["data"]]


def test_pooling_an_embedding_model_gives_its_embeddings(server):
    answer = pooling(server, model=server.model_name, input=TEXTS)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["id"].startswith("pooling-") and body["object"] == "list" and body["model"] == server.model_name
    assert [(d["index"], d["object"]) for d in body["data"]] == [(0, "pooling"), (1, "pooling"), (2, "pooling")]
    for d, want in zip(body["data"], embeddings(server, input=TEXTS)):
        assert len(d["data"]) == 64
        np.testing.assert_allclose(d["data"], want, atol=1e-6)
        assert abs(np.linalg.norm(d["data"]) - 1) < 1e-5
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    assert body["usage"]["completion_tokens"] == 0


def test_pooled_vectors_equal_offline_embed(server):
    offline = OfflineLLM(runner="pooling", device="cpu", kv_cache_memory_gb=0.05)
    ids = [[5, 6, 7, 8, 9], [10, 11]]
    want = [np.array(o.outputs.embedding) for o in offline.embed(ids, use_tqdm=False)]
    got = pooling(server, input=ids, task="embed").json()["data"]
    for d, w in zip(got, want):
        np.testing.assert_allclose(d["data"], w, atol=1e-6)


def test_use_activation_false_gives_the_raw_pooled_vector(server):
    raw = np.array(pooling(server, input=TEXTS[0], use_activation=False).json()["data"][0]["data"])
    plain = np.array(pooling(server, input=TEXTS[0]).json()["data"][0]["data"])
    assert abs(np.linalg.norm(raw) - 1) > 1e-3
    np.testing.assert_allclose(raw / np.linalg.norm(raw), plain, atol=1e-5)


def test_chat_messages_pool_as_on_the_embeddings_route(server):
    conversation = [{"role": "user", "content": "The sky is blue."}]
    got = pooling(server, messages=conversation, add_generation_prompt=True).json()
    want = embeddings(server, messages=conversation, add_generation_prompt=True)[0]
    np.testing.assert_allclose(got["data"][0]["data"], want, atol=1e-6)
    both = pooling(server, messages=conversation, add_generation_prompt=True, continue_final_message=True)
    assert both.status_code == 400 and "Cannot set both" in both.json()["error"]["message"]


@pytest.mark.parametrize("extra, message", [
    ({"dimensions": 8}, "dimensions is currently not supported"),
    ({"task": "classify"}, "Unsupported task: 'classify' Supported tasks: ('embed',)"),
    ({"task": "token_embed"}, "Unsupported task: 'token_embed' Supported tasks: ('embed',)"),
    ({"task": "score"}, "`score` task was removed; use `classify` instead."),
    ({"task": "encode"}, "`encode` task was removed; use `token_embed` or `token_classify` instead."),
    ({"task": "plugin"}, "No IOProcessor plugin installed."),
    ({"task": "generate"}, "Invalid value for 'task'"),
])
def test_what_vllm_refuses_is_a_400_with_its_words(server, extra, message):
    answer = pooling(server, input=TEXTS[0], **extra)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["message"].startswith(message) and error["param"] == next(iter(extra))


def test_a_plugin_body_is_refused_here_and_through_invocations(server):
    for path in ("/pooling", "/invocations"):
        answer = requests.post(server.url + path, json={"data": {"image": "x"}}, timeout=30)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["message"].startswith("No IOProcessor plugin installed.")
        assert answer.json()["error"]["param"] == "task"


def test_bad_prompts_are_400s(server):
    for body, param in (({"input": []}, "input"), ({}, "input"), ({"input": [5] * 100000}, "input"),
                        ({"input": "x", "truncate_prompt_tokens": 10 ** 6}, "truncate_prompt_tokens")):
        answer = pooling(server, **body)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text


def test_a_generating_server_refuses_pooling():
    with ServerThread() as srv:
        answer = requests.post(srv.url + "/pooling", json={"input": "hi"}, timeout=30)
    assert answer.status_code == 400 and "--runner pooling" in answer.json()["error"]["message"]
