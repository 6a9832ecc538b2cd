"""POST /generate, vLLM's simple API: the quickstart's request, streaming, and the example client."""

from __future__ import annotations

import os
import subprocess
import sys

import aiohttp
import orjson
import pytest

from server_fixtures import ServerThread

QUICKSTART = {"prompt": "San Francisco is a", "use_beam_search": True, "n": 4, "temperature": 0,
              "max_tokens": 8}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def server():
    with ServerThread() as s:
        yield s


async def post(url: str, body: dict):
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body) as resp:
            return resp.status, await resp.read()


async def test_quickstart_beam_search_returns_n_texts_with_the_prompt(server):
    status, raw = await post(server.url + "/generate", QUICKSTART)
    assert status == 200, raw
    texts = orjson.loads(raw)["text"]
    assert len(texts) == 4
    assert all(t.startswith(QUICKSTART["prompt"]) for t in texts)


async def test_streaming_sends_growing_full_texts_then_closes(server):
    body = {"prompt": "Hello", "temperature": 0, "max_tokens": 8, "ignore_eos": True}
    status, raw = await post(server.url + "/generate", body)
    final = orjson.loads(raw)["text"]
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/generate", json={**body, "stream": True}) as resp:
            assert resp.status == 200
            lines = [orjson.loads(line) async for line in resp.content if line.strip()]
    assert len(lines) >= 2
    texts = [line["text"][0] for line in lines]
    assert all(t.startswith("Hello") for t in texts)
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # each holds the text so far
    assert texts[-1] == final[0]


async def test_streamed_beam_search_ends_with_the_plain_answer(server):
    status, raw = await post(server.url + "/generate", QUICKSTART)
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/generate", json={**QUICKSTART, "stream": True}) as resp:
            lines = [orjson.loads(line) async for line in resp.content if line.strip()]
    assert lines[-1]["text"] == orjson.loads(raw)["text"]


async def test_streamed_beam_search_sends_no_frame_without_new_text(server):
    # The README's example once streamed ~15 frames of the prompt alone before the beams came.
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/generate", json={**QUICKSTART, "stream": True}) as resp:
            frames = [orjson.loads(line)["text"] async for line in resp.content if line.strip()]
    prompt_only = [QUICKSTART["prompt"]] * len(frames[0])
    assert frames and all(frame != prompt_only for frame in frames), frames
    assert all(a != b for a, b in zip(frames, frames[1:])), frames
    assert all(len(frame) == QUICKSTART["n"] for frame in frames)


async def test_bad_sampling_field_is_a_400_in_openai_shape(server):
    status, raw = await post(server.url + "/generate", {"prompt": "x", "n": 0})
    assert status == 400
    assert orjson.loads(raw)["error"]["param"] == "n"


def test_example_api_client_streams(server):
    out = subprocess.run([sys.executable, os.path.join(REPO, "examples", "api_client.py"),
                          "--port", str(server.port), "--host", "127.0.0.1", "--stream", "--n", "2",
                          "--max-tokens", "4", "--prompt", "Hello"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Beam candidate 0" in out.stdout or "Output 0" in out.stdout


async def test_detokenize_false_answers_the_prompt_alone_and_refuses_stop_strings(server):
    """vLLM's /generate passes every SamplingParams field: detokenize=False makes no text."""
    body = {"prompt": "San Francisco is a", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    status, raw = await post(server.url + "/generate", body)
    assert status == 200 and orjson.loads(raw)["text"][0] != body["prompt"]
    status, raw = await post(server.url + "/generate", {**body, "detokenize": False})
    assert status == 200 and orjson.loads(raw)["text"] == [body["prompt"]]
    status, raw = await post(server.url + "/generate", {**body, "detokenize": False, "stop": ["a"]})
    assert status == 400 and "detokenize" in orjson.loads(raw)["error"]["message"]
