"""The server with its engine in a process of its own (--engine-process, engine/engine_process.py):
the same answers as the in-process engine, bad input refused with a 400, a client that leaves
frees its blocks in the engine process, /metrics counts what the engine process did, the
engine process's death ends the engine, and a shutdown leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request

import openai
import pytest
import torch

from aserve import OfflineLLM, SamplingParams
from aserve.config import EngineArgs
from aserve.engine.process_async_engine import ProcessAsyncEngine
from aserve.server.cli import engine_args_from, engine_in_own_process, make_parser, placed_engine_args
from hf_reference import random_prompts
from server_fixtures import ServerThread, small_engine_args, subprocess_server

PROMPTS = random_prompts(11, [5, 17, 3, 30, 9])


@pytest.fixture(scope="module")
def server():
    with ServerThread(engine_process=True) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client()


def _metric(server, name: str) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(f"aserve:{name}{{")]
    assert values, f"/metrics has no {name}"
    return sum(values)


def test_greedy_tokens_and_logprobs_are_the_in_process_engines(server, client):
    llm = OfflineLLM(**{k: v for k, v in vars(small_engine_args()).items() if k in EngineArgs.field_names()})
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    want = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, expected in zip(PROMPTS, want):
        got = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=12, temperature=0.0,
                                        logprobs=2, extra_body={"ignore_eos": True, "return_token_ids": True})
        choice = got.choices[0]
        assert choice.token_ids == expected.outputs[0].token_ids
        assert choice.text == expected.outputs[0].text
        chosen = [lp[token].logprob for lp, token in zip(expected.outputs[0].logprobs, choice.token_ids)]
        assert choice.logprobs.token_logprobs == pytest.approx(chosen, abs=1e-4)
        assert got.usage.prompt_tokens == len(prompt) and got.usage.completion_tokens == 12


def test_streams_concurrently_each_with_its_own_tokens(server):
    import concurrent.futures

    async_client = server.openai_client()

    def stream(i: int) -> tuple[str, int]:
        chunks = async_client.chat.completions.create(
            model=server.model_name, messages=[{"role": "user", "content": f"number {i}"}], max_tokens=8 + i,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, usage = "", None
        for chunk in chunks:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        return text, usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, range(16)))
    assert [tokens for _, tokens in results] == [8 + i for i in range(16)]


def test_a_request_the_engine_refuses_is_a_400_and_the_engine_goes_on(server, client):
    # The logprobs bound is the engine's check (RequestFactory): its ValueError crosses the pipe.
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model_name, prompt="hi", max_tokens=4, logprobs=25)
    assert "--max-logprobs" in str(info.value)
    ok = client.completions.create(model=server.model_name, prompt="still serving", max_tokens=3)
    assert ok.usage.completion_tokens >= 1


def test_structured_outputs_are_checked_at_the_door_and_constrain_the_engine_process(server, client):
    # The server compiles the grammar itself (a 400 before anything streams); the engine process
    # applies it.
    for stream in (False, True):
        got = client.completions.create(model=server.model_name, prompt="a number:", max_tokens=8,
                                        stream=stream, extra_body={"guided_regex": "[0-9]{3}"})
        text = "".join(c.choices[0].text for c in got) if stream else got.choices[0].text
        assert re.fullmatch("[0-9]{3}", text), text
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model_name, prompt="x", max_tokens=4,
                                  extra_body={"guided_regex": "(unclosed"})
    assert info.value.body["param"] == "guided_regex"


def test_the_engine_process_is_the_default_on_a_cuda_device_only(monkeypatch):
    assert not engine_in_own_process(None, EngineArgs(device="cpu"))
    assert not engine_in_own_process(None, EngineArgs(device="cuda"))   # none here: the load says so
    assert engine_in_own_process(True, EngineArgs(device="cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)     # as on a GPU machine
    assert engine_in_own_process(None, EngineArgs(device="auto"))
    assert not engine_in_own_process(False, EngineArgs(device="auto"))


def test_the_driver_rests_less_after_a_delivery_than_with_the_engine_in_its_process(server):
    """The rest no longer leaves the engine the GIL; it only gathers tokens into fewer chunks."""
    from aserve.engine import async_engine, engine_driver, process_async_engine

    if engine_driver.DELIVERY_REST_OVERRIDE is None:   # ASERVE_DELIVERY_REST sets both, for benchmarks
        assert server.async_engine.delivery_rest == process_async_engine.PROCESS_DELIVERY_REST == 2.0
        assert async_engine.DELIVERY_REST == 6.0


def test_an_engine_in_its_own_process_takes_a_large_gpus_larger_steps(monkeypatch):
    """As offline: it steps alone (aserve/config.py). An engine in the server's process keeps
    the smaller steps, and flags the user gave stay as given."""
    import aserve.config as config

    monkeypatch.setattr(config, "device_class", lambda device: "large-gpu")   # as on an H100 or H200
    gpu = torch.device("cuda")
    server_args = engine_args_from(make_parser().parse_args([]))
    alone, beside = placed_engine_args(server_args, True), placed_engine_args(server_args, False)
    assert (alone.resolve_max_num_seqs(gpu), alone.resolve_max_num_batched_tokens(gpu)) == (512, 16384)
    assert (beside.resolve_max_num_seqs(gpu), beside.resolve_max_num_batched_tokens(gpu)) == (256, 8192)
    assert alone.usage_context == "engine_process" and beside.usage_context == "api_server"
    given = placed_engine_args(engine_args_from(make_parser().parse_args(["--max-num-seqs", "64"])), True)
    assert given.resolve_max_num_seqs(gpu) == 64


def test_a_client_that_leaves_frees_its_blocks_in_the_engine_process(server):
    body = json.dumps({"model": server.model_name, "prompt": "a long story", "max_tokens": 1500,
                       "ignore_eos": True, "stream": True}).encode()
    request = urllib.request.Request(server.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        response.readline()   # the first chunk: the request is running
        assert _metric(server, "num_requests_running") == 1
        assert _metric(server, "kv_cache_used_blocks") > 0
    deadline = time.monotonic() + 20
    while _metric(server, "num_requests_running") or _metric(server, "kv_cache_used_blocks"):
        assert time.monotonic() < deadline, "the engine process kept the request that left"
        time.sleep(0.05)


def test_metrics_and_reset_prefix_cache_reach_the_engine_process(server, client):
    before = _metric(server, "request_success_total")
    client.completions.create(model=server.model_name, prompt="count me", max_tokens=5)
    assert _metric(server, "request_success_total") == before + 1
    assert _metric(server, "generation_tokens_total") >= 5
    request = urllib.request.Request(server.url + "/reset_prefix_cache", method="POST")
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 200


def test_the_engine_process_dying_ends_the_engine_and_shutdown_leaves_no_process():
    with ServerThread(engine_process=True) as s:
        client = s.openai_client()
        assert client.completions.create(model=s.model_name, prompt="hi", max_tokens=2).usage.completion_tokens
        process = s.async_engine._process
        process.kill()
        deadline = time.monotonic() + 20
        while s.async_engine.is_running:
            assert time.monotonic() < deadline, "the server did not notice its engine process died"
            time.sleep(0.05)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(s.url + "/health", timeout=10)
        assert info.value.code == 503
        with pytest.raises(openai.APIStatusError):
            client.completions.create(model=s.model_name, prompt="hi", max_tokens=2)
    with ServerThread(engine_process=True) as s:
        process = s.async_engine._process
        assert process.is_alive()
    assert not process.is_alive(), "the engine process outlived its server"


def test_a_model_that_cannot_load_raises_and_leaves_no_process(tmp_path):
    with pytest.raises(Exception) as info:
        ProcessAsyncEngine(EngineArgs(model=str(tmp_path / "no-such-model"), device="cpu"))
    assert "no-such-model" in str(info.value)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_cli_flag_serves_through_an_engine_process_that_ends_with_the_server(sig):
    from test_tp_server import _children, _wait_gone

    with subprocess_server("--engine-process", "--device", "cpu", "--num-gpu-blocks-override", "512") as (url, proc, _):
        (engine,) = _children(proc.pid)
        body = json.dumps({"prompt": "hello", "max_tokens": 4, "ignore_eos": True}).encode()
        request = urllib.request.Request(url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 4
        proc.send_signal(sig)
        assert proc.wait(60) == 0
        _wait_gone([engine])


def test_a_request_that_cannot_cross_to_the_engine_process_fails_alone(server, client):
    params = SamplingParams(max_tokens=2)
    params.unpicklable = lambda: None   # nothing the API makes; a Python caller's object might

    async def add():
        with pytest.raises(ValueError, match="cannot be sent to the engine process"):
            await server.async_engine.add_request("cannot-cross", [1, 2, 3], params)
        return server.async_engine.num_waiting, server.async_engine.num_open_streams

    assert server.call(add) == (0, 0)
    assert client.completions.create(model=server.model_name, prompt="after", max_tokens=2).usage.completion_tokens


def test_embeddings_come_from_an_engine_process_as_from_the_in_process_engine():
    llm = OfflineLLM(runner="pooling", device="cpu", kv_cache_memory_gb=0.05)
    want = llm.embed(["pooled in another process"], use_tqdm=False)[0].outputs.embedding
    with ServerThread(small_engine_args(runner="pooling"), engine_process=True) as s:
        got = s.openai_client().embeddings.create(model=s.model_name, input="pooled in another process")
    assert got.data[0].embedding == pytest.approx(want, abs=1e-5)


def test_a_stream_joined_from_the_engines_deltas_is_the_whole_answer(server, client):
    """A streamed completion runs as DELTA in the engine process and is joined back in the
    server (engine/output_wire.py): its chunks add up to the non-streamed answer."""
    kwargs = dict(model=server.model_name, prompt=PROMPTS[3], max_tokens=40, temperature=0.0, logprobs=1,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
    whole = client.completions.create(**kwargs).choices[0]
    text, token_ids, logprobs = "", [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.text
            token_ids += choice.token_ids or []
            logprobs += choice.logprobs.token_logprobs if choice.logprobs else []
    assert (text, token_ids) == (whole.text, whole.token_ids)
    assert logprobs == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)


def test_one_server_makes_its_plain_streams_text_as_the_engine_would(server, client):
    """The one API server over the engine process decodes its plain streams' token ids itself
    (server_detokenizer.py, as vLLM's front end): streamed or not, the text the engine makes
    offline. Random ids of the byte-level model split characters over tokens."""
    assert server.async_engine.text_here
    prompts = random_prompts(5, [7, 3, 12, 5, 9, 4], vocab=1000)
    llm = OfflineLLM(device="cpu", kv_cache_memory_gb=0.05)
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, skip_special_tokens=False)
    want = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    assert any("\ufffd" in text for text in want)
    for prompt, text in zip(prompts, want):
        kwargs = dict(model=server.model_name, prompt=prompt, max_tokens=14, temperature=0.0,
                      extra_body={"ignore_eos": True, "skip_special_tokens": False})
        assert client.completions.create(**kwargs).choices[0].text == text
        streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
        assert streamed == text


def test_tensor_parallel_ranks_under_an_engine_process_serve_and_end_with_it():
    """--engine-process with --tensor-parallel-size 2 (gloo on the CPU): the engine process
    starts rank 1 and serves rank 0's tokens; a killed rank ends the engine, and the server
    exits non-zero with every process gone."""
    from test_tp_server import TP2, _alive, _children, _health_until_exit, _wait_gone

    expected = OfflineLLM(kv_cache_memory_gb=0.05).generate(
        ["San Francisco is a"], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].text
    with subprocess_server("--engine-process", *TP2) as (url, proc, log_path):
        (engine,) = _children(proc.pid)
        (worker,) = _children(engine)
        client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        stream = client.completions.create(model=model, prompt="San Francisco is a", max_tokens=12,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        assert "".join(chunk.choices[0].text for chunk in stream) == expected
        os.kill(worker, signal.SIGKILL)
        statuses = _health_until_exit(url, proc)
        assert 503 in statuses
        assert proc.returncode == 1
        _wait_gone([engine])
        assert not _alive(worker)
        with open(log_path) as f:
            assert "worker rank 1" in f.read()


@pytest.mark.skipif(not hasattr(__import__("fcntl"), "F_SETPIPE_SZ"), reason="pipe sizes are Linux's")
def test_the_engine_process_pipes_take_a_batch_larger_than_the_default_buffer_without_a_reader():
    """A batch of ~260 KB (512 first outputs with their prompts) through a 64 KiB pipe returned
    from send only once the server's reader thread had taken the rest, while the engine process
    stepped none; a widened pipe takes it at once."""
    import fcntl
    import multiprocessing
    import threading

    from aserve.engine.process_async_engine import widen_pipe

    message = os.urandom(300_000)

    def sent_within(writer, seconds: float) -> bool:
        done = threading.Event()
        threading.Thread(target=lambda: (writer.send_bytes(message), done.set()), daemon=True).start()
        return done.wait(seconds)

    reader, writer = multiprocessing.get_context("spawn").Pipe(duplex=False)
    assert not sent_within(writer, 0.5)     # the default buffer: stuck until it is read
    assert reader.recv_bytes() == message   # (and it is whole once read)
    assert widen_pipe(reader) >= 1 << 20
    assert fcntl.fcntl(writer.fileno(), fcntl.F_GETPIPE_SZ) >= 1 << 20   # one pipe, both ends
    assert sent_within(writer, 5.0)
    assert reader.recv_bytes() == message
    for end in (reader, writer):
        end.close()


def test_the_server_and_its_engine_process_talk_through_widened_pipes(server):
    import fcntl

    if not hasattr(fcntl, "F_GETPIPE_SZ"):
        pytest.skip("pipe sizes are Linux's")
    engine = server.async_engine
    for conn in (engine._ops_out, engine._batches_in):
        assert fcntl.fcntl(conn.fileno(), fcntl.F_GETPIPE_SZ) >= 1 << 20
