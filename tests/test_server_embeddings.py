"""/v1/embeddings, /score and /rerank through a real server on loopback (--runner pooling), with
the official openai client where it has the route: the vectors equal OfflineLLM.embed's on the
same prompts, as floats or base64; token-id input, dimensions, usage; scores are the cosines of
those vectors; the generation routes refuse, and a generating server refuses these, with 400s."""

from __future__ import annotations

import numpy as np
import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aserve import OfflineLLM
from server_fixtures import ServerThread, small_engine_args

TEXTS = ["The sky is blue.", "Embeddings map text to vectors", "x"]


@pytest.fixture(scope="module")
def server():
    with ServerThread(small_engine_args(runner="pooling")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client()


@pytest.fixture(scope="module")
def offline():
    return OfflineLLM(runner="pooling", device="cpu", kv_cache_memory_gb=0.05)


def _offline_vectors(offline, prompts):
    tok = offline.get_tokenizer()
    ids = [tok.encode(p) if isinstance(p, str) else p for p in prompts]   # special tokens added, as vLLM
    return [np.array(o.outputs.embedding) for o in offline.embed(ids, use_tqdm=False)]


def test_embeddings_equal_offline_ones_as_floats_and_base64(client, server, offline):
    expected = _offline_vectors(offline, TEXTS)
    floats = client.embeddings.create(model=server.model_name, input=TEXTS, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    for got, want in zip(floats.data, expected):
        np.testing.assert_allclose(got.embedding, want, atol=1e-6)
        assert abs(np.linalg.norm(got.embedding) - 1.0) < 1e-5
    encoded = client.embeddings.create(model=server.model_name, input=TEXTS)   # the client asks base64
    for got, want in zip(encoded.data, expected):
        np.testing.assert_allclose(got.embedding, want, atol=1e-6)
    tok = offline.get_tokenizer()
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(len(tok.encode(t)) for t in TEXTS)


def test_token_id_input_and_dimensions(client, server, offline):
    ids = [[5, 6, 7, 8, 9], [10, 11]]
    got = client.embeddings.create(model=server.model_name, input=ids, encoding_format="float")
    for d, want in zip(got.data, _offline_vectors(offline, ids)):
        np.testing.assert_allclose(d.embedding, want, atol=1e-6)
    one = client.embeddings.create(model=server.model_name, input=ids[0], dimensions=8, encoding_format="float")
    raw = _offline_vectors(offline, ids[:1])[0]
    assert len(one.data[0].embedding) == 8
    np.testing.assert_allclose(one.data[0].embedding, raw[:8] / np.linalg.norm(raw[:8]), atol=1e-5)


def test_bad_requests_and_the_generation_routes_are_400s(client, server):
    with pytest.raises(openai.BadRequestError, match="input"):
        client.embeddings.create(model=server.model_name, input=[])
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=server.model_name, input="hi", dimensions=100000)
    giant = requests.post(server.url + "/v1/embeddings", json={"input": "x" * 1_000_000}, timeout=30)
    assert giant.status_code == 400   # refused before validation, as a too-long prompt
    assert giant.json()["error"]["param"] == "input"
    body = {"model": server.model_name, "prompt": "hello", "max_tokens": 3}
    refused = requests.post(server.url + "/v1/completions", json=body, timeout=30)
    assert refused.status_code == 400 and "embed" in refused.json()["error"]["message"]


def test_an_input_may_fill_the_whole_context_and_no_more(client, server):
    """An input to embed generates nothing, so max_model_len ids fit (a prompt to generate from
    needs one position less); one more is a 400 naming `input`, as ids and as a batch."""
    max_len = client.models.list().data[0].max_model_len
    whole = [(7 * i) % 500 + 3 for i in range(max_len)]
    got = client.embeddings.create(model=server.model_name, input=whole, encoding_format="float")
    assert got.usage.prompt_tokens == max_len
    for too_long in (whole + [5], [[5, 6], whole + [5]]):
        refused = requests.post(server.url + "/v1/embeddings", json={"input": too_long}, timeout=30)
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "input"
        assert refused.json()["error"]["code"] == "context_length_exceeded"


def test_a_generating_server_refuses_embeddings():
    with ServerThread() as srv:
        answers = [requests.post(srv.url + "/v1/embeddings", json={"input": "hi"}, timeout=30),
                   requests.post(srv.url + "/score", json={"text_1": "a", "text_2": "b"}, timeout=30),
                   requests.post(srv.url + "/rerank", json={"query": "a", "documents": ["b"]}, timeout=30)]
    for answer in answers:
        assert answer.status_code == 400 and "--runner pooling" in answer.json()["error"]["message"]


def test_the_cli_takes_vllms_flags_for_a_pooling_runner():
    from aserve.server.cli import engine_args_from, make_parser

    for argv in (["--runner", "pooling"], ["--task", "embed"], ["--convert", "embed"]):
        assert engine_args_from(make_parser().parse_args(argv)).runner == "pooling"
    assert engine_args_from(make_parser().parse_args([])).runner == "generate"


def _cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_score_pairs_texts_by_the_cosine_of_their_embeddings(server, offline):
    vectors = dict(zip(TEXTS, _offline_vectors(offline, TEXTS)))
    body = {"model": server.model_name, "text_1": TEXTS[0], "text_2": TEXTS[1:]}
    answer = requests.post(server.url + "/score", json=body, timeout=30).json()
    assert [d["index"] for d in answer["data"]] == [0, 1] and answer["object"] == "list"
    for d, other in zip(answer["data"], TEXTS[1:]):
        assert abs(d["score"] - _cosine(vectors[TEXTS[0]], vectors[other])) < 1e-5
    pairs = requests.post(server.url + "/v1/score", json={"text_1": TEXTS[:2], "text_2": TEXTS[1:]}, timeout=30)
    assert abs(pairs.json()["data"][1]["score"] - _cosine(vectors[TEXTS[1]], vectors[TEXTS[2]])) < 1e-5
    bad = requests.post(server.url + "/score", json={"text_1": TEXTS[:2], "text_2": TEXTS}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text_2"


@pytest.mark.parametrize("names", [("queries", "documents"), ("queries", "items"), ("data_1", "data_2")])
def test_score_takes_vllms_other_names_for_its_two_sides(server, names):
    plain = requests.post(server.url + "/score", json={"text_1": TEXTS[0], "text_2": TEXTS[1:]}, timeout=30).json()
    first, second = names
    answer = requests.post(server.url + "/score", json={first: TEXTS[0], second: TEXTS[1:]}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert [d["score"] for d in answer.json()["data"]] == [d["score"] for d in plain["data"]]


def test_invocations_routes_pooling_bodies_by_their_shape(server):
    """vLLM's SageMaker route on a pooling model: embeddings, rerank and score bodies each get
    the answer their own route gives."""
    def both(path: str, body: dict):
        routed = requests.post(server.url + "/invocations", json=body, timeout=30)
        direct = requests.post(server.url + path, json=body, timeout=30)
        assert routed.status_code == direct.status_code == 200, routed.text
        return routed.json(), direct.json()

    routed, direct = both("/v1/embeddings", {"input": TEXTS[0], "encoding_format": "float"})
    assert routed["data"][0]["embedding"] == direct["data"][0]["embedding"]
    routed, direct = both("/rerank", {"query": TEXTS[0], "documents": TEXTS[1:]})
    assert [r["index"] for r in routed["results"]] == [r["index"] for r in direct["results"]]
    routed, direct = both("/score", {"queries": TEXTS[0], "documents": TEXTS[1:]})
    assert [d["score"] for d in routed["data"]] == [d["score"] for d in direct["data"]]
    neither = requests.post(server.url + "/invocations", json={"prompt": "hi"}, timeout=30)
    assert neither.status_code == 400 and "EmbeddingRequest" in neither.json()["error"]["message"]


def test_use_activation_false_is_normalize_false(client, server):
    """vLLM's newer name: use_activation false leaves the vector as pooled, unnormalised."""
    def vector(**extra):
        body = {"input": TEXTS[0], "encoding_format": "float", **extra}
        return np.array(requests.post(server.url + "/v1/embeddings", json=body, timeout=30).json()["data"][0]["embedding"])

    raw, plain = vector(use_activation=False), vector()
    assert np.allclose(raw, vector(normalize=False)) and abs(np.linalg.norm(plain) - 1) < 1e-4
    assert np.allclose(raw / np.linalg.norm(raw), plain, atol=1e-5)


def test_too_long_inputs_and_truncations_say_what_vllm_says(client, server):
    max_len = client.models.list().data[0].max_model_len
    too_big = requests.post(server.url + "/v1/embeddings", json={"input": "hello", "truncate_prompt_tokens": max_len + 1},
                            timeout=30).json()["error"]
    assert too_big["message"] == ("truncate_prompt_tokens value is greater than max_model_len. Please request a "
                                  "smaller truncation size.")
    too_long = requests.post(server.url + "/v1/embeddings", json={"input": [5] * (max_len + 1)}, timeout=30)
    assert "Please reduce the length of the input prompt" in too_long.json()["error"]["message"]


def test_rerank_returns_documents_best_first_and_top_n(server, offline):
    query, documents = TEXTS[0], [TEXTS[1], {"text": TEXTS[2]}, "another one"]
    texts = [TEXTS[1], TEXTS[2], "another one"]
    vectors = _offline_vectors(offline, [query] + texts)
    expected = sorted(range(3), key=lambda i: _cosine(vectors[0], vectors[i + 1]), reverse=True)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        answer = requests.post(server.url + path, json={"query": query, "documents": documents, "top_n": 2},
                               timeout=30).json()
        assert [r["index"] for r in answer["results"]] == expected[:2]
        assert answer["results"][0]["document"]["text"] == texts[expected[0]]
        assert answer["usage"]["total_tokens"] > 0
    everything = requests.post(server.url + "/rerank", json={"query": query, "documents": documents}, timeout=30)
    assert len(everything.json()["results"]) == 3


@given(body=st.fixed_dictionaries({}, optional={
    "input": st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 2000), max_size=8),
                       st.lists(st.text(max_size=10), max_size=3), st.integers(), st.none()),
    "encoding_format": st.sampled_from(["float", "base64", "int8"]), "dimensions": st.integers(-2, 70),
    "truncate_prompt_tokens": st.integers(-2, 600), "normalize": st.booleans(), "model": st.text(max_size=5)}))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_embeddings_body_gets_vectors_or_a_400_never_a_500(server, body):
    answer = requests.post(server.url + "/v1/embeddings", json=body, timeout=30)
    assert answer.status_code in (200, 400, 404), answer.text
    if answer.status_code == 200:
        assert all(d["object"] == "embedding" for d in answer.json()["data"])
    else:
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}


def test_the_embeddings_example_runs_against_a_pooling_server(server):
    import os
    import subprocess
    import sys

    example = os.path.join(os.path.dirname(__file__), "..", "examples", "openai_embeddings_client.py")
    done = subprocess.run([sys.executable, example, "--base-url", server.url], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dimensions: 64" in done.stdout and done.stdout.count("  ") >= 2
