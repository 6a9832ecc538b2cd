"""/health, /metrics, /tokenize, /detokenize and the periodic status line."""

from __future__ import annotations

import logging
import re
import time

import aiohttp
import orjson
import pytest

from server_fixtures import ServerThread


@pytest.fixture(scope="module")
def server():
    with ServerThread() as s:
        yield s


async def get(server, path):
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + path) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


async def post(server, path, body):
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + path, json=body) as resp:
            return resp.status, orjson.loads(await resp.read())


async def test_health_answers_200_while_the_engine_runs(server):
    status, _, _ = await get(server, "/health")
    assert status == 200


async def test_metrics_are_prometheus_text_and_count_requests(server):
    status, body = await post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 5,
                                                          "ignore_eos": True})
    assert status == 200
    status, content_type, raw = await get(server, "/metrics")
    text = raw.decode()
    assert status == 200 and content_type.startswith("text/plain")

    def value(name: str) -> float:
        return float(re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))

    for gauge in ("aserve:num_requests_running", "aserve:num_requests_waiting", "aserve:kv_cache_usage_perc"):
        assert f"# TYPE {gauge} gauge" in text
        assert value(gauge) >= 0
    assert value("aserve:prompt_tokens_total") >= body["usage"]["prompt_tokens"]
    assert value("aserve:generation_tokens_total") >= 5
    for hist in ("aserve:time_to_first_token_seconds", "aserve:time_per_output_token_seconds",
                 "aserve:e2e_request_latency_seconds"):
        assert f"# TYPE {hist} histogram" in text
        assert value(f"{hist}_count") >= 1
        assert f'{hist}_bucket{{model_name="{server.model_name}",engine="0",le="+Inf"}}' in text
    assert re.search(r'aserve:request_success_total\{[^}]*finished_reason="length"\} [1-9]', text)


async def test_tokenize_and_detokenize_round_trip(server):
    status, tok = await post(server, "/tokenize", {"prompt": "Hello world"})
    assert status == 200 and tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 2048
    status, detok = await post(server, "/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and "Hello world" in detok["prompt"]


async def test_tokenize_messages_counts_the_chat_prompt(server):
    messages = [{"role": "user", "content": "Hi there"}]
    _, tok = await post(server, "/tokenize", {"messages": messages})
    _, chat = await post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    assert tok["count"] == chat["usage"]["prompt_tokens"]


async def test_detokenize_rejects_ids_outside_the_vocabulary(server):
    status, body = await post(server, "/detokenize", {"tokens": [-1]})
    assert status == 400 and body["error"]["param"]


def test_status_line_is_logged_while_busy(server, caplog):
    server.state.status_interval_s = 0.2  # read when the logger sleeps next
    caplog.set_level(logging.INFO, logger="aserve.server")
    client = server.openai_client()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "generation throughput" not in caplog.text:
        client.completions.create(model=server.model_name, prompt="Hi", max_tokens=200,
                                  extra_body={"ignore_eos": True})
    line = next(r.getMessage() for r in caplog.records if "generation throughput" in r.getMessage())
    for part in ("prompt throughput", "tokens/s", "Running:", "Waiting:", "KV cache usage:"):
        assert part in line


async def test_a_given_chat_template_replaces_the_tokenizers(server):
    messages = [{"role": "user", "content": "Hi there"}]
    server.call(lambda: setattr(server.state, "chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}"))
    try:
        _, tok = await post(server, "/tokenize", {"messages": messages})
    finally:
        server.call(lambda: setattr(server.state, "chat_template", None))
    expected = server.state.tokenizer("Hi there", add_special_tokens=False).input_ids
    assert tok["tokens"] == expected


def test_the_serving_benchmark_runs_against_the_server(server, tmp_path):
    import json
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = tmp_path / "result.json"
    out = subprocess.run([sys.executable, os.path.join(repo, "bench", "serving.py"), "--base-url", server.url,
                          "--num-prompts", "6", "--request-rate", "50", "--input-len", "8",
                          "--output-len", "4", "--ignore-eos", "--result-json", str(result)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(result.read_text())
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["output_token_throughput"] > 0 and summary["ttft_ms"]["p99"] > 0
    assert "Time to First Token" in out.stdout and "P99" in out.stdout
    assert summary["client"]["processes"] == 1 and summary["client"]["cpu_s"] > 0


def test_the_serving_benchmark_shares_its_requests_over_client_processes(server, tmp_path):
    """--processes: every request is sent once, from processes of their own, and the results
    come together in one summary."""
    import json
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = tmp_path / "result.json"
    before = server.call(lambda: server.state.async_engine.engine.get_stats())
    out = subprocess.run([sys.executable, os.path.join(repo, "bench", "serving.py"), "--base-url", server.url,
                          "--num-prompts", "7", "--input-len", "8", "--output-len", "3", "--ignore-eos",
                          "--processes", "2", "--result-json", str(result)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(result.read_text())
    assert summary["completed"] == 7 and summary["failed"] == 0
    assert summary["client"]["processes"] == 2
    after = server.call(lambda: server.state.async_engine.engine.get_stats())
    assert after.generation_tokens_total - before.generation_tokens_total == 7 * 3   # each sent once
    assert "Client CPU (cores busy)" in out.stdout


def test_the_serving_benchmark_can_open_its_connections_before_the_clock(server, tmp_path):
    """--warm-connections (with client processes too): the requests all complete over the
    connections opened beforehand, and the summary says the run was measured so."""
    import json
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for processes in ("1", "2"):
        result = tmp_path / f"result{processes}.json"
        out = subprocess.run([sys.executable, os.path.join(repo, "bench", "serving.py"), "--base-url", server.url,
                              "--num-prompts", "6", "--input-len", "8", "--output-len", "3", "--ignore-eos",
                              "--warm-connections", "--processes", processes, "--result-json", str(result)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        summary = json.loads(result.read_text())
        assert summary["completed"] == 6 and summary["failed"] == 0
        assert summary["client"]["warm_connections"] is True
        assert "over connections opened beforehand" in out.stdout
