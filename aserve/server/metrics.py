"""Server metrics: /metrics in Prometheus' text format, and the periodic one-line status log.

The names, types, labels and buckets are vLLM's v1 engine's (vllm/v1/metrics/loggers.py), with
the prefix `aserve:` in place of `vllm:` (`--metrics-prefix vllm` restores vLLM's, so its
Grafana dashboards work unchanged). Gauges and token counters are read from Engine.get_stats()
at scrape time; histograms and finish reasons from the engine's EngineStatsRecorder, which the
engine thread feeds. A scrape copies counters and lists: no lock, nothing per request, never a
wait for a step. Written by hand: the format is a few lines of text, not worth a dependency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

logger = logging.getLogger("aserve.server")

# vLLM's finish reasons, always rendered (a dashboard's rate() needs the series from the start);
# "error" is aserve's: a request the engine failed.
FINISH_REASONS = ("stop", "length", "abort", "error")

# (name without prefix, help) of each histogram, in the order rendered.
HISTOGRAMS = (
    ("iteration_tokens_total", "Histogram of number of tokens per engine_step."),
    ("time_to_first_token_seconds", "Histogram of time to first token in seconds."),
    ("inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
    ("request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request."),
    ("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),
    ("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request."),
    ("request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request."),
    ("request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request."),
    ("request_decode_time_seconds", "Histogram of time spent in DECODE phase for request."),
    ("request_prompt_tokens", "Number of prefill tokens processed."),
    ("request_generation_tokens", "Number of generation tokens processed."),
    ("request_prefill_kv_computed_tokens",
     "Histogram of new KV tokens computed during prefill (excluding cached tokens)."),
    ("request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens."),
    ("request_params_n", "Histogram of the n request parameter."),
    ("request_params_max_tokens", "Histogram of the max_tokens request parameter."),
    ("request_num_preemptions", "Number of preemptions per request."),
)
# Older vLLM dashboards plot time_per_output_token_seconds: vLLM emitted it with the same
# observations as inter_token_latency_seconds until it retired the name; so does aserve.
ALIASES = {"time_per_output_token_seconds": ("inter_token_latency_seconds",
                                             "Histogram of time per output token in seconds "
                                             "(the same as inter_token_latency_seconds).")}


class ServerMetrics:
    """Everything /metrics reports for one served model."""

    def __init__(self, async_engine, model_name: str, prefix: str = "aserve"):
        self.async_engine = async_engine
        self.prefix = prefix
        # vLLM's labels: the served model and the engine's index (one engine here).
        self.labels = f'model_name="{_escape(model_name)}",engine="0"'
        engine = async_engine.engine
        cache, args = engine.cache_config, getattr(engine, "args", None)
        # vLLM's cache_config_info: an info metric, a gauge at 1 whose labels are the settings,
        # with the KV cache's size in tokens and how many requests of the whole context it holds.
        kv_tokens = cache.num_blocks * cache.block_size
        max_len = getattr(getattr(engine, "model_config", None), "max_model_len", None) or kv_tokens
        self.cache_info = {
            "block_size": cache.block_size, "num_gpu_blocks": cache.num_blocks,
            "num_cpu_blocks": "None", "cache_dtype": "auto",
            "gpu_memory_utilization": getattr(args, "gpu_memory_utilization", ""),
            "enable_prefix_caching": getattr(args, "enable_prefix_caching", ""),
            "kv_cache_size_tokens": kv_tokens,
            "kv_cache_max_concurrency": f"{kv_tokens / max(1, max_len):.2f}",
            "engine": "0"}

    def render(self) -> str:
        stats = self.async_engine.get_stats()
        recorder = self.async_engine.stats
        p, lab = self.prefix, self.labels
        lines: list[str] = []

        def header(name: str, kind: str, help: str) -> str:
            lines.extend([f"# HELP {p}:{name} {help}", f"# TYPE {p}:{name} {kind}"])
            return f"{p}:{name}"

        def scalar(kind: str, name: str, help: str, value) -> None:
            header(name, kind, help)
            lines.append(f"{p}:{name}{{{lab}}} {value}")

        scalar("gauge", "num_requests_running", "Number of requests in model execution batches.",
               stats.num_running)
        scalar("gauge", "num_requests_waiting", "Number of requests waiting to be processed.",
               stats.num_waiting)
        # vLLM's split of the waiting: for room in the batch (capacity), or for something else
        # first (deferred: aserve compiles grammars before a request enters, so none).
        name = header("num_requests_waiting_by_reason", "gauge", "Number of requests waiting, by reason.")
        lines.append(f'{name}{{{lab},reason="capacity"}} {stats.num_waiting}')
        lines.append(f'{name}{{{lab},reason="deferred"}} 0')
        scalar("gauge", "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
               float(stats.kv_cache_usage))
        scalar("gauge", "kv_cache_used_blocks", "KV cache blocks in use (aserve's).", stats.num_used_blocks)
        scalar("gauge", "kv_cache_total_blocks", "KV cache blocks in all (aserve's).", stats.num_total_blocks)
        scalar("counter", "prefix_cache_queries_total",
               "Prefix cache queries, in terms of number of queried tokens.", stats.prefix_cache_queries)
        scalar("counter", "prefix_cache_hits_total",
               "Prefix cache hits, in terms of number of cached tokens.", stats.prefix_cache_hits)
        scalar("counter", "num_preemptions_total", "Cumulative number of preemption from the engine.",
               stats.num_preemptions)
        scalar("counter", "prompt_tokens_total", "Number of prefill tokens processed.",
               stats.prompt_tokens_total)
        scalar("counter", "generation_tokens_total", "Number of generation tokens processed.",
               stats.generation_tokens_total)
        if recorder is not None:
            name = header("prompt_tokens_by_source_total", "counter", "Number of prompt tokens by source.")
            for source, n in recorder.prompt_tokens_by_source.items():
                lines.append(f'{name}{{{lab},source="{source}"}} {n}')
            scalar("counter", "prompt_tokens_cached_total", "Number of cached prompt tokens (local + external).",
                   recorder.prompt_tokens_cached)
            scalar("counter", "prompt_tokens_recomputed_total",
                   "Number of cached tokens recomputed for forward pass.", recorder.prompt_tokens_recomputed)
        name = header("request_success_total", "counter", "Count of successfully processed requests.")
        reasons = dict(recorder.finished_by_reason) if recorder is not None else {}
        for reason in (*FINISH_REASONS, *sorted(set(reasons) - set(FINISH_REASONS))):
            lines.append(f'{name}{{{lab},finished_reason="{_escape(reason)}"}} {reasons.get(reason, 0)}')
        if recorder is not None:
            for hist_name, help in HISTOGRAMS:
                self._histogram(lines, hist_name, help, recorder.histograms[hist_name])
            for alias, (source, help) in ALIASES.items():
                self._histogram(lines, alias, help, recorder.histograms[source])
        name = header("cache_config_info", "gauge", "Information of the LLMEngine CacheConfig")
        info = ",".join(f'{k}="{_escape(str(v))}"' for k, v in self.cache_info.items())
        lines.append(f"{name}{{{info}}} 1.0")
        return "\n".join(lines) + "\n"

    def _histogram(self, lines: list[str], name: str, help: str, hist) -> None:
        full, lab = f"{self.prefix}:{name}", self.labels
        lines.extend([f"# HELP {full} {help}", f"# TYPE {full} histogram"])
        cumulative, total = hist.snapshot()
        for bound, n in zip((*hist.buckets, "+Inf"), cumulative):
            le = bound if bound == "+Inf" else repr(float(bound))
            lines.append(f'{full}_bucket{{{lab},le="{le}"}} {n}')
        lines.append(f"{full}_count{{{lab}}} {cumulative[-1]}")
        lines.append(f"{full}_sum{{{lab}}} {total}")


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
