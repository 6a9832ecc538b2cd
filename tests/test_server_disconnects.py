"""A disconnect storm against `python -m aserve`: hundreds of mixed requests (streamed or not,
completions, chat, responses, /generate, samples, beams, logprobs), a third of whose clients
leave at a random moment. Every request whose client stayed gets its whole answer; afterwards
nothing is running or waiting and no KV block is held; the aborts are counted in /metrics; the
log has no ERROR and no traceback, only an INFO line per abort. `--fuzz-long` (bench/) sends more."""

from __future__ import annotations

import asyncio
import random
import re
import time

import aiohttp
import orjson

from server_fixtures import subprocess_server

KINDS = [
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": True}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": True, "stream": True}),
    ("/v1/completions", {"prompt": ["A", "B"], "max_tokens": 32, "n": 2, "temperature": 0.8, "stream": True,
                         "logprobs": 2, "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 48,
                              "ignore_eos": True, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 48,
                              "ignore_eos": True, "logprobs": True, "top_logprobs": 2}),
    ("/v1/responses", {"input": "Hi", "max_output_tokens": 48, "ignore_eos": True, "stream": True}),
    ("/v1/responses", {"input": "Hi", "max_output_tokens": 48, "ignore_eos": True, "top_logprobs": 2,
                       "include": ["message.output_text.logprobs"]}),
    ("/generate", {"prompt": "Hello", "max_tokens": 48, "ignore_eos": True, "stream": True}),
    ("/generate", {"prompt": "Hello", "max_tokens": 24, "use_beam_search": True, "n": 2, "best_of": 3}),
]


async def one(session, url: str, path: str, body: dict) -> bool:
    """Send the request and check its whole answer; True when complete."""
    async with session.post(url + path, json=body) as resp:
        raw = await resp.read()
    assert resp.status == 200, raw[:300]
    if body.get("stream"):
        if path == "/generate":
            assert b'"error"' not in raw and raw.endswith(b"\n")
        elif path == "/v1/responses":   # typed events, the last one the response's end
            assert b"event: error" not in raw and b"event: response.incomplete\n" in raw.rsplit(b"\n\n", 2)[-2]
        else:
            assert raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw, raw[-300:]
    else:
        answer = orjson.loads(raw)
        if path == "/generate":
            assert "text" in answer
        elif path == "/v1/responses":
            assert answer["usage"]["output_tokens"] == 48
        else:
            assert answer["usage"]["completion_tokens"] > 0
    return True


async def metrics(session, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    found = {m.group(1): float(m.group(2)) for m in
             re.finditer(r'^(aserve:[a-z_]+)\{model_name="[^"]*",engine="0"\} (\S+)$', text, re.M)}
    aborts = re.search(r'aserve:request_success_total\{[^}]*finished_reason="abort"\} (\S+)', text)
    found["aborted"] = float(aborts.group(1)) if aborts else 0.0
    return found


async def test_a_disconnect_storm_leaves_nothing_behind(fuzz_long):
    sent = 1000 if fuzz_long else 300
    rng = random.Random(12)
    with subprocess_server("--kv-cache-memory-gb", "0.3") as (url, _, log_path):
        url = url.replace("localhost", "127.0.0.1")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=600)) as session:
            tasks, dropped = [], []
            for i in range(sent):
                path, body = KINDS[i % len(KINDS)]
                tasks.append(asyncio.ensure_future(one(session, url, path, body)))
                if rng.random() < 1 / 3:
                    dropped.append(tasks[-1])
                    asyncio.get_running_loop().call_later(rng.uniform(0.0, 2.0), tasks[-1].cancel)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            completed = sum(r is True for r in results)
            cut = sum(isinstance(r, asyncio.CancelledError) for r in results)
            failures = [r for r in results if not (r is True or isinstance(r, asyncio.CancelledError))]
            assert not failures, failures[:3]
            assert completed + cut == sent and cut <= len(dropped)
            deadline = time.monotonic() + 60
            while True:
                after = await metrics(session, url)
                idle = (after["aserve:num_requests_running"], after["aserve:num_requests_waiting"],
                        after["aserve:kv_cache_used_blocks"]) == (0, 0, 0)
                if idle or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        with open(log_path) as f:
            log = f.read()
    leaked = after["aserve:kv_cache_used_blocks"]
    print(f"\ndisconnect storm: {sent} sent, {cut} dropped by their clients, {completed} completed, "
          f"{after['aborted']:.0f} aborts counted, {leaked:.0f} KV blocks leaked, "
          f"{after['aserve:num_requests_running']:.0f} running, {after['aserve:num_requests_waiting']:.0f} waiting")
    assert idle, after
    assert cut > sent // 10 and 0 < after["aborted"] <= cut * 2  # a batch of 2 prompts aborts 2
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
    assert log.count("Aborted request") == after["aborted"]
