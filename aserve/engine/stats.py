"""The engine's request and step statistics, as vLLM's v1 engine keeps them for Prometheus.

The engine thread records (one call per step, one per finished request, one per request that
got tokens in a step); the server's /metrics reads the counts while the engine steps, without a
lock: every field is a plain int, float or list of ints that a reader copies whole under the
GIL. A scrape may see a histogram one observation behind its own count, never a torn value.
Offline use (OfflineLLM) records nothing: `Engine.stats` is None there, as vLLM's LLM class
runs with its stat loggers off.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

# vLLM's buckets, so that dashboards' quantiles and SLO thresholds read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                         5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)


@dataclass(frozen=True)
class EngineStats:
    """The engine's counts at one moment (Engine.get_stats: the status line, /metrics' gauges)."""

    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_total_blocks: int
    kv_cache_usage: float
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions: int
    prefix_cache_queries: int = 0    # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0       # of those, found there


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's buckets for token counts)."""
    out, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(out)
            out.append(mantissa * scale)
        scale *= 10


class Histogram:
    """Cumulative-bucket histogram data (Prometheus' `le` semantics: a value equal to a bound
    counts in that bound's bucket)."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)   # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += count
        self.sum += value * count

    def snapshot(self) -> tuple[list[int], float]:
        """(cumulative counts per bucket, +Inf last; sum): what a scrape renders."""
        counts, total = list(self.counts), self.sum
        running, cumulative = 0, []
        for n in counts:
            running += n
            cumulative.append(running)
        return cumulative, total


class EngineStatsRecorder:
    """What vLLM's PrometheusStatLogger records, fed by the Engine in its own thread."""

    def __init__(self, max_model_len: int):
        tokens = buckets_1_2_5(max_model_len)
        self.histograms: dict[str, Histogram] = {
            "iteration_tokens_total": Histogram(ITERATION_TOKENS_BUCKETS),
            "time_to_first_token_seconds": Histogram(TTFT_BUCKETS),
            "inter_token_latency_seconds": Histogram(TOKEN_LATENCY_BUCKETS),
            "request_time_per_output_token_seconds": Histogram(TOKEN_LATENCY_BUCKETS),
            "e2e_request_latency_seconds": Histogram(REQUEST_LATENCY_BUCKETS),
            "request_queue_time_seconds": Histogram(REQUEST_LATENCY_BUCKETS),
            "request_inference_time_seconds": Histogram(REQUEST_LATENCY_BUCKETS),
            "request_prefill_time_seconds": Histogram(REQUEST_LATENCY_BUCKETS),
            "request_decode_time_seconds": Histogram(REQUEST_LATENCY_BUCKETS),
            "request_prompt_tokens": Histogram(tokens),
            "request_generation_tokens": Histogram(tokens),
            "request_prefill_kv_computed_tokens": Histogram(tokens),
            "request_max_num_generation_tokens": Histogram(tokens),
            "request_params_n": Histogram(PARAMS_N_BUCKETS),
            "request_params_max_tokens": Histogram(tokens),
            "request_num_preemptions": Histogram(tokens),
        }
        h = self.histograms
        self._iteration, self._ttft, self._itl = (h["iteration_tokens_total"],
                                                  h["time_to_first_token_seconds"],
                                                  h["inter_token_latency_seconds"])
        self.finished_by_reason: Counter[str] = Counter()
        # Prompt tokens of requests that finished their prefill, by where their KV came from
        # (vLLM's sources; aserve has no external KV transfer, and never recomputes a cached
        # token: the block holding a prompt's last token is never taken from the cache).
        self.prompt_tokens_by_source: Counter[str] = Counter(
            {"local_compute": 0, "local_cache_hit": 0, "external_kv_transfer": 0})
        self.prompt_tokens_cached = 0
        self.prompt_tokens_recomputed = 0
        # Inter-token latencies of the step being applied. Most requests of a step had their
        # previous token in the step before, so they share one latency: a count of those, and
        # a list of the others' (after a preemption, a long prefill of others, ...). Per token
        # this costs a compare and an add, not a histogram observation.
        self._last_step_time = -1.0
        self._itl_from_last_step = 0
        self._itl_others: list[float] = []

    # ---------------------------------------------------------------- per step
    def on_token(self, request, now: float) -> None:
        """A request got its next token(s) in the step applied at `now`."""
        metrics = request.metrics
        last = metrics.last_token_time
        metrics.last_token_time = now
        if last == self._last_step_time:
            self._itl_from_last_step += 1
        elif last is None:   # its first token: the prefill is done
            self._ttft.observe(max(0.0, now - metrics.arrival_time))
            cached = request.num_cached_tokens or 0
            self.prompt_tokens_by_source["local_compute"] += len(request.prompt_token_ids) - cached
            self.prompt_tokens_by_source["local_cache_hit"] += cached
            self.prompt_tokens_cached += cached
        else:
            self._itl_others.append(now - last)

    def on_step(self, num_tokens: int, now: float) -> None:
        """A step was applied at `now`: it computed num_tokens prompt and generated tokens."""
        if num_tokens:
            self._iteration.observe(num_tokens)
        if self._itl_from_last_step:
            self._itl.observe(max(0.0, now - self._last_step_time), self._itl_from_last_step)
            self._itl_from_last_step = 0
        if self._itl_others:
            for latency in self._itl_others:
                self._itl.observe(max(0.0, latency))
            self._itl_others.clear()
        self._last_step_time = now

    # ---------------------------------------------------------------- per request
    def on_finished(self, request, reason: str, now: float) -> None:
        """A request ended (stop, length, abort or error); vLLM's FinishedRequestStats."""
        self.finished_by_reason[reason] += 1
        m, params, h = request.metrics, request.params, self.histograms
        num_prompt = len(request.prompt_token_ids)
        num_generated = m.num_generation_tokens
        h["e2e_request_latency_seconds"].observe(max(0.0, now - m.arrival_time))
        # As vLLM: the phases a request reached are observed, no more (one aborted while
        # waiting has no queue time yet; one aborted in its prefill has no prefill time).
        scheduled, first, last = m.first_scheduled_time, m.first_token_time, m.last_token_time
        if scheduled is not None:
            h["request_queue_time_seconds"].observe(max(0.0, scheduled - m.arrival_time))
        if scheduled is not None and first is not None and last is not None:
            decode = max(0.0, last - first)
            h["request_prefill_time_seconds"].observe(max(0.0, first - scheduled))
            h["request_decode_time_seconds"].observe(decode)
            h["request_inference_time_seconds"].observe(max(0.0, last - scheduled))
            if num_generated > 1:
                h["request_time_per_output_token_seconds"].observe(decode / (num_generated - 1))
        h["request_prompt_tokens"].observe(num_prompt)
        h["request_generation_tokens"].observe(num_generated)
        cached = request.num_cached_tokens or 0
        h["request_prefill_kv_computed_tokens"].observe(max(0, num_prompt - cached))
        h["request_max_num_generation_tokens"].observe(
            max((seq.num_output_tokens for seq in request.seqs), default=0))
        h["request_params_n"].observe(params.n)
        h["request_num_preemptions"].observe(request.num_preemptions)
        if params.max_tokens is not None:
            h["request_params_max_tokens"].observe(params.max_tokens)


def finish_reason_of(request) -> str:
    """vLLM's finished_reason label of a request that ended in the engine: stop, length or
    abort; aserve adds error (a request the engine failed). Read from what the client gets:
    a beam search's final beams (its live sequences may all be gone by then)."""
    if request.error is not None:
        return "error"
    if request.beam_outputs is not None:
        reasons = [o.finish_reason for o in request.beam_outputs]
    else:
        reasons = [seq.finish_reason for seq in request.seqs]
    reasons = [r for r in reasons if r is not None]
    if not reasons or "abort" in reasons:
        return "abort"
    return "length" if all(r == "length" for r in reasons) else "stop"
