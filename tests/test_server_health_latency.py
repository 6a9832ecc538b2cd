"""/health stays fast while the server is busy: `python -m aserve` under 256 streams, heavy
streams (logprobs, echo, n=2), a giant prompt and the most stop strings allowed, all at once.
The figures are printed (pytest -s) for bench/RESULTS.md."""

from __future__ import annotations

import gc
import statistics

import load_client
from health_probe import HealthProbe
from aserve.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from server_fixtures import subprocess_server

# What the test guards against is a loop held for seconds (a 30 MB prompt tokenized on it held
# every client 30-48 s). Alone, the p99 here is 34-65 ms; late in a full CI run on the 2-core
# machine the same code measured 105-115 ms in every round of two runs out of four (twentieth
# session; 8789af9's code gave the same figures as this session's with a core kept busy), so
# 100 ms failed runs that had nothing held. 150 ms leaves that margin and still fails a held loop.
P99_LIMIT_S = 0.150


def load_bodies() -> list[dict]:
    light = [{"prompt": f"Request {i}: tell me", "max_tokens": 48, "ignore_eos": True, "stream": True,
              "temperature": 0.8, "seed": i} for i in range(256)]
    heavy = [{"prompt": "word " * 300, "max_tokens": 48, "ignore_eos": True, "stream": True,
              "logprobs": 5, "echo": True, "n": 2} for _ in range(32)]
    giant = [{"prompt": "word " * 2_000_000, "max_tokens": 4}]
    stops = [{"prompt": "Hello", "max_tokens": 48, "n": 16, "stream": True, "ignore_eos": True,
              "stop": [chr(65 + i) * MAX_STOP_STRING_CHARS for i in range(MAX_STOP_STRINGS)]}]
    return light + heavy + giant + stops


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# Rounds of load at most: another round runs only while each so far was over the limit. On the
# 2-core CI machine, full test runs saw one-off stalls of 116-191 ms in about half the runs
# while the server's own garbage collections stayed under 15 ms and the same test alone stayed
# at 34-73 ms; a stall of the machine passes, a server that holds its loop does not (each round
# is the whole load). Once (nineteenth session) two rounds in a row came out at 127 and 110 ms
# (p50 0.8 ms), and the test alone right after at 43-47 ms: hence three.
ROUNDS = 3


def test_health_p99_stays_under_150ms_under_heavy_load():
    # The test process (the load client's threads) shares the 2 cores with the server. Late in a
    # full run it holds every module and fixture so far, and a full collection of that heap
    # takes a core for 100 ms and more: collected once here, and kept off while the load runs
    # (reference counting still frees the client's garbage), so the server is what is measured.
    gc.collect()
    gc.disable()
    try:
        _measure()
    finally:
        gc.enable()


def _measure() -> None:
    with subprocess_server("--kv-cache-memory-gb", "0.3") as (url, _, _log):
        url = url.replace("localhost", "127.0.0.1")
        p99s = []
        for _ in range(ROUNDS):
            with HealthProbe(int(url.rsplit(":", 1)[1])) as probe:
                statuses = load_client.result(load_client.start(url, load_bodies()))["statuses"]
            latencies = probe.latencies
            assert statuses.count(200) == len(statuses) - 1 and statuses.count(400) == 1  # the giant one
            assert len(latencies) >= 100
            p50, p99, worst = (percentile(latencies, 0.5), percentile(latencies, 0.99), max(latencies))
            print(f"\n/health under load: {len(latencies)} probes, p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
                  f"max {worst * 1e3:.1f} ms (mean {statistics.mean(latencies) * 1e3:.1f})")
            p99s.append(p99)
            if p99 < P99_LIMIT_S:
                break
    assert min(p99s) < P99_LIMIT_S, f"/health p99 {', '.join(f'{p * 1e3:.0f}' for p in p99s)} ms"
