"""Server metrics: /metrics in Prometheus' text format, and the periodic one-line status log.

Gauges and token counters are read from Engine.get_stats() at scrape time (the engine owns
those facts); latency histograms are fed by the AsyncEngine with each finished request.
Names mirror vLLM's (prefix `aserve:` instead of `vllm:`) so dashboards port by a rename.
Written by hand: the format is a few lines of text, not worth a dependency.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import Counter
from typing import Callable

from aserve.outputs import RequestOutput

logger = logging.getLogger("aserve.server")

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Histogram:
    """A cumulative-bucket histogram, rendered the way Prometheus expects."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, labels: str) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{self.name}_bucket{{{labels},le="{le}"}} {cumulative}')
        lines.append(f"{self.name}_sum{{{labels}}} {self.sum}")
        lines.append(f"{self.name}_count{{{labels}}} {self.count}")
        return lines


class ServerMetrics:
    """Everything /metrics reports for one served model."""

    def __init__(self, async_engine, model_name: str):
        self.async_engine = async_engine
        self.labels = f'model_name="{_escape(model_name)}"'
        self.ttft = Histogram("aserve:time_to_first_token_seconds",
                              "Time from arrival to the first generated token.", _LATENCY_BUCKETS)
        self.tpot = Histogram("aserve:time_per_output_token_seconds",
                              "Mean time between output tokens of a request after the first.",
                              _TPOT_BUCKETS)
        self.e2e = Histogram("aserve:e2e_request_latency_seconds",
                             "Time from arrival to the last token of a request.", _LATENCY_BUCKETS)
        self.finished_by_reason: Counter[str] = Counter()
        async_engine.add_finished_listener(self.on_request_finished)

    def on_request_finished(self, output: RequestOutput) -> None:
        reason = "error" if output.error else (output.outputs[0].finish_reason if output.outputs else None)
        self.finished_by_reason[reason or "abort"] += 1
        m = output.metrics
        if m is None or output.error:
            return
        if m.first_token_time is not None:
            self.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
        if m.finished_time is not None:
            self.e2e.observe(max(0.0, m.finished_time - m.arrival_time))
            num_tokens = m.num_generation_tokens or max((len(o.token_ids) for o in output.outputs), default=0)
            if m.first_token_time is not None and num_tokens > 1:
                self.tpot.observe(max(0.0, (m.finished_time - m.first_token_time) / (num_tokens - 1)))

    def render(self) -> str:
        stats = self.async_engine.get_stats()
        lab = self.labels
        lines: list[str] = []

        def scalar(kind: str, name: str, help: str, value) -> None:
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name}{{{lab}}} {value}"])

        scalar("gauge", "aserve:num_requests_running", "Requests being computed.", stats.num_running)
        scalar("gauge", "aserve:num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        scalar("gauge", "aserve:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).",
               float(stats.kv_cache_usage))
        scalar("gauge", "aserve:kv_cache_used_blocks", "KV cache blocks in use.", stats.num_used_blocks)
        scalar("gauge", "aserve:kv_cache_total_blocks", "KV cache blocks in all.", stats.num_total_blocks)
        scalar("counter", "aserve:prompt_tokens_total", "Prompt tokens computed.", stats.prompt_tokens_total)
        scalar("counter", "aserve:generation_tokens_total", "Tokens generated.",
               stats.generation_tokens_total)
        scalar("counter", "aserve:prefix_cache_queries_total",
               "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries)
        scalar("counter", "aserve:prefix_cache_hits_total",
               "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
        name = "aserve:request_success_total"
        lines += [f"# HELP {name} Finished requests by finish reason.", f"# TYPE {name} counter"]
        # Requests aborted (a client that left, a shutdown) never finish in the engine: the
        # AsyncEngine counts them, under vLLM's finished_reason="abort".
        reasons = Counter(self.finished_by_reason)
        reasons["abort"] += self.async_engine.num_aborted
        for reason, n in sorted(reasons.items()):
            lines.append(f'{name}{{{lab},finished_reason="{_escape(reason)}"}} {n}')
        for hist in (self.ttft, self.tpot, self.e2e):
            lines += hist.render(lab)
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def log_status_periodically(async_engine, interval_s: Callable[[], float]) -> None:
    """Log one status line every interval_s() seconds while the engine is busy (silent while idle)."""
    stats = async_engine.get_stats()
    # Plain ints: get_stats may hand back the same object each time.
    last_prompt, last_gen = stats.prompt_tokens_total, stats.generation_tokens_total
    last_queries, last_hits = stats.prefix_cache_queries, stats.prefix_cache_hits
    last_time = time.monotonic()
    while True:
        await asyncio.sleep(interval_s())
        try:
            stats = async_engine.get_stats()
        except Exception:  # the status line is a convenience; it must never kill the server
            logger.debug("get_stats failed", exc_info=True)
            continue
        now = time.monotonic()
        elapsed = max(now - last_time, 1e-9)
        prompt_tps = (stats.prompt_tokens_total - last_prompt) / elapsed
        gen_tps = (stats.generation_tokens_total - last_gen) / elapsed
        queries = stats.prefix_cache_queries - last_queries
        hit_rate = 100.0 * (stats.prefix_cache_hits - last_hits) / queries if queries else 0.0
        if stats.num_running or stats.num_waiting or prompt_tps or gen_tps:
            logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                        "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
                        "Prefix cache hit rate: %.1f%%", prompt_tps, gen_tps, stats.num_running,
                        stats.num_waiting, 100.0 * stats.kv_cache_usage, hit_rate)
        last_prompt, last_gen = stats.prompt_tokens_total, stats.generation_tokens_total
        last_queries, last_hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        last_time = now
