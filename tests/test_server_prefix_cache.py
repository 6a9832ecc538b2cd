"""Prefix caching seen from the server: usage, /metrics, the status line, the reset route."""

from __future__ import annotations

import logging
import urllib.request

import pytest

from aserve.server.cli import engine_args_from, make_parser
from server_fixtures import ServerThread

# Long enough for several 16-token blocks of the built-in model's byte-level tokenizer.
SYSTEM = "You are a helpful assistant who answers in one short sentence. " * 4


@pytest.fixture(scope="module")
def server():
    # Set before the start: the status logger reads its interval when it next sleeps, so a
    # later change would wait out its first sleep (test servers' 1 s).
    with ServerThread(state_options={"status_interval_s": 0.2, "enable_prompt_tokens_details": True}) as s:
        yield s


def _complete(server, prompt: str):
    client = server.openai_client()
    return client.completions.create(model=server.model_name, prompt=prompt, max_tokens=4, temperature=0)


def _metric(server, name: str) -> float:
    with urllib.request.urlopen(server.url + "/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing from /metrics")


def test_usage_reports_the_cached_prompt_tokens_and_metrics_count_them(server):
    queries, hits = _metric(server, "aserve:prefix_cache_queries_total"), _metric(server, "aserve:prefix_cache_hits_total")
    first = _complete(server, SYSTEM + "What is the capital of France?")
    second = _complete(server, SYSTEM + "What is two plus two?")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert _metric(server, "aserve:prefix_cache_queries_total") == queries + first.usage.prompt_tokens + second.usage.prompt_tokens
    assert _metric(server, "aserve:prefix_cache_hits_total") == hits + cached


def test_reset_prefix_cache_route_forgets_cached_prefixes(server):
    prompt = SYSTEM + "Tell me a joke."
    _complete(server, prompt)
    request = urllib.request.Request(server.url + "/reset_prefix_cache", method="POST")
    with urllib.request.urlopen(request) as r:
        assert r.status == 200
    assert _complete(server, prompt).usage.prompt_tokens_details.cached_tokens == 0


def test_the_status_line_shows_the_hit_rate(server, caplog):
    with caplog.at_level(logging.INFO, logger="aserve.server"):
        _complete(server, SYSTEM + "Where is the sea?")
        server.wait_until(lambda stats: False, timeout=0.6)   # a few status intervals
    assert any("Prefix cache hit rate" in r.getMessage() for r in caplog.records)


def test_the_flag_turns_prefix_caching_off():
    assert engine_args_from(make_parser().parse_args([])).enable_prefix_caching is True
    args = engine_args_from(make_parser().parse_args(["--no-enable-prefix-caching"]))
    assert args.enable_prefix_caching is False
