"""/metrics as vLLM's v1 engine exports it: every name, type and label, read with Prometheus'
own text parser after real requests ran (finished, aborted, n > 1, preempted)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_fixtures import ServerThread, small_engine_args

# vLLM's names (prefix aside) and types, as prometheus_client's parser reports them (counter
# families lose their _total there, as vLLM's do).
VLLM_METRICS = {
    "num_requests_running": "gauge",
    "num_requests_waiting": "gauge",
    "num_requests_waiting_by_reason": "gauge",
    "kv_cache_usage_perc": "gauge",
    "prefix_cache_queries": "counter",
    "prefix_cache_hits": "counter",
    "num_preemptions": "counter",
    "prompt_tokens": "counter",
    "prompt_tokens_by_source": "counter",
    "prompt_tokens_cached": "counter",
    "prompt_tokens_recomputed": "counter",
    "generation_tokens": "counter",
    "request_success": "counter",
    "iteration_tokens_total": "histogram",
    "time_to_first_token_seconds": "histogram",
    "inter_token_latency_seconds": "histogram",
    "time_per_output_token_seconds": "histogram",
    "request_time_per_output_token_seconds": "histogram",
    "e2e_request_latency_seconds": "histogram",
    "request_queue_time_seconds": "histogram",
    "request_inference_time_seconds": "histogram",
    "request_prefill_time_seconds": "histogram",
    "request_decode_time_seconds": "histogram",
    "request_prompt_tokens": "histogram",
    "request_generation_tokens": "histogram",
    "request_prefill_kv_computed_tokens": "histogram",
    "request_max_num_generation_tokens": "histogram",
    "request_params_n": "histogram",
    "request_params_max_tokens": "histogram",
    "request_num_preemptions": "histogram",
    "cache_config_info": "gauge",
}


def scrape(url: str, prefix: str = "aserve") -> dict:
    """{name without prefix: family} of every family /metrics reports."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    families = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith(prefix + ":"), family.name
        families[family.name.removeprefix(prefix + ":")] = family
    return families


def value(family, suffix: str = "", **labels) -> float:
    """The one sample of a family whose name ends with suffix and whose labels include labels."""
    found = [s.value for s in family.samples
             if s.name.endswith(suffix) and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family.name, suffix, labels, family.samples)
    return found[0]


@pytest.fixture(scope="module")
def server():
    # 24 blocks of 16 tokens: four requests of ~200 tokens cannot all hold their blocks, so the
    # scheduler preempts (the preemption counter must move).
    with ServerThread(small_engine_args(num_gpu_blocks_override=24)) as s:
        yield s


async def abort_one_stream(url: str) -> None:
    """A streamed completion whose client leaves after the first chunk."""
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/completions", json={
                "prompt": "Leave early", "max_tokens": 200, "ignore_eos": True, "stream": True}) as resp:
            await resp.content.readline()


def test_every_vllm_metric_has_its_name_type_and_labels(server):
    client = server.openai_client(timeout=120)
    client.completions.create(model=server.model_name, prompt="Hello", max_tokens=5, extra_body={"ignore_eos": True})
    client.completions.create(model=server.model_name, prompt="Two", max_tokens=3, n=2, temperature=1.0)
    client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=4, extra_body={"ignore_eos": True})

    async def crowd():   # four long requests at once in 24 blocks: preemptions
        async with aiohttp.ClientSession() as session:
            async def one(i):
                async with session.post(server.url + "/v1/completions", json={
                        "prompt": f"Request {i}", "max_tokens": 180, "ignore_eos": True}) as resp:
                    assert resp.status == 200, await resp.text()
            await asyncio.gather(*(one(i) for i in range(4)))
            async with session.post(server.url + "/generate", json={   # ends with its beams
                    "prompt": "Beams", "use_beam_search": True, "n": 2, "max_tokens": 4, "temperature": 0}) as resp:
                assert resp.status == 200, await resp.text()
        await abort_one_stream(server.url)
    asyncio.run(crowd())

    deadline = time.monotonic() + 20
    while True:   # the abort reaches the engine at its next step boundary
        metrics = scrape(server.url)
        if value(metrics["request_success"], finished_reason="abort") >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    for name, kind in VLLM_METRICS.items():
        assert name in metrics, name
        assert metrics[name].type == kind, (name, metrics[name].type)
    labels = {"model_name": server.model_name, "engine": "0"}
    for name, family in metrics.items():
        if name != "cache_config_info":
            for sample in family.samples:
                assert {k: sample.labels.get(k) for k in labels} == labels, sample

    success = metrics["request_success"]
    assert value(success, finished_reason="length") + value(success, finished_reason="stop") == 8
    assert value(success, finished_reason="abort") == 1 and value(success, finished_reason="error") == 0
    finished = 9
    for hist in ("e2e_request_latency_seconds", "request_queue_time_seconds", "request_prompt_tokens",
                 "request_generation_tokens", "request_params_n", "request_params_max_tokens"):
        assert value(metrics[hist], "_count") == finished, hist
        assert value(metrics[hist], "_bucket", le="+Inf") == finished, hist
    assert value(metrics["request_params_n"], "_sum") == 1 + 2 + 1 + 4 + 2 + 1
    assert value(metrics["request_params_max_tokens"], "_sum") == 5 + 3 + 4 + 4 * 180 + 4 + 200
    assert value(metrics["num_preemptions"]) >= 1
    # vLLM's newer series: preemptions per request, the waiting by reason, the cache's size.
    assert value(metrics["request_num_preemptions"], "_count") == finished
    assert 1 <= value(metrics["request_num_preemptions"], "_sum") <= value(metrics["num_preemptions"])
    assert {s.labels["reason"] for s in metrics["num_requests_waiting_by_reason"].samples} == {"capacity", "deferred"}
    info = metrics["cache_config_info"].samples[0].labels
    assert int(info["kv_cache_size_tokens"]) == int(info["num_gpu_blocks"]) * int(info["block_size"])
    assert float(info["kv_cache_max_concurrency"]) > 0
    # Tokens: every step's tokens, and each request's generated ones, add up.
    generated = value(metrics["generation_tokens"])
    assert value(metrics["request_generation_tokens"], "_sum") == generated
    assert value(metrics["iteration_tokens_total"], "_sum") == generated + value(metrics["prompt_tokens"])
    assert value(metrics["time_to_first_token_seconds"], "_count") == finished
    prompts = value(metrics["request_prompt_tokens"], "_sum")
    by_source = metrics["prompt_tokens_by_source"]
    assert (value(by_source, source="local_compute") + value(by_source, source="local_cache_hit")
            == prompts)
    assert value(by_source, source="local_cache_hit") == value(metrics["prompt_tokens_cached"])
    # One inter-token latency per request per step after its first token.
    assert value(metrics["inter_token_latency_seconds"], "_count") >= 4 * 179
    assert (value(metrics["time_per_output_token_seconds"], "_count")
            == value(metrics["inter_token_latency_seconds"], "_count"))
    info = metrics["cache_config_info"].samples[0]
    assert info.value == 1 and info.labels["block_size"] == "16" and info.labels["num_gpu_blocks"] == "24"
    assert value(metrics["num_requests_running"]) == 0 and value(metrics["kv_cache_usage_perc"]) == 0


def test_histogram_buckets_are_vllms(server):
    metrics = scrape(server.url)
    bounds = [s.labels["le"] for s in metrics["time_to_first_token_seconds"].samples
              if s.name.endswith("_bucket")]
    assert bounds[:3] == ["0.001", "0.005", "0.01"] and bounds[-2:] == ["2560.0", "+Inf"]
    tokens = [s.labels["le"] for s in metrics["request_prompt_tokens"].samples if s.name.endswith("_bucket")]
    # 1-2-5 buckets up to max_model_len (2048 for the built-in model).
    assert tokens == ["1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "100.0", "200.0", "500.0",
                      "1000.0", "2000.0", "+Inf"]


def test_metrics_prefix_vllm_serves_vllms_names():
    # --metrics-prefix vllm: a vLLM Grafana dashboard reads aserve unchanged.
    with ServerThread(state_options={"metrics_prefix": "vllm"}) as s:
        client = openai.OpenAI(base_url=s.openai_base_url, api_key="EMPTY", max_retries=0, timeout=60)
        client.completions.create(model=s.model_name, prompt="Hi", max_tokens=2)
        metrics = scrape(s.url, prefix="vllm")
    for name, kind in VLLM_METRICS.items():
        assert metrics[name].type == kind, name
    assert value(metrics["request_success"], finished_reason="length") == 1


def test_prompt_tokens_count_the_whole_prompt_prefix_cache_hits_too():
    """vLLM's test_metrics_counts: ten requests of one prompt (the cache serves the later ones
    most of it) count every prompt token, in prompt_tokens and in the iteration tokens."""
    with ServerThread() as srv:
        client = srv.openai_client()
        prompt = "the same words every time, long enough to fill a block of the cache"
        before = scrape(srv.url)
        for _ in range(10):
            resp = client.completions.create(model=srv.model_name, prompt=prompt, max_tokens=10, temperature=0,
                                             extra_body={"ignore_eos": True})
        prompt_tokens = resp.usage.prompt_tokens
        after = scrape(srv.url)

    def grew(name: str, suffix: str = "") -> float:
        return value(after[name], suffix) - value(before[name], suffix)

    assert value(after["prompt_tokens_by_source"], source="local_cache_hit") > 0   # the cache served some
    assert grew("prompt_tokens") == 10 * prompt_tokens
    assert grew("iteration_tokens_total", "_sum") == 10 * (prompt_tokens + 10)
