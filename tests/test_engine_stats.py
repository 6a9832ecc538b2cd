"""The engine's statistics for /metrics (engine/stats.py): the values vLLM defines, from a
request's timestamps, exactly."""

from __future__ import annotations

from types import SimpleNamespace

from aserve.engine.stats import EngineStatsRecorder, buckets_1_2_5, finish_reason_of
from aserve.outputs import CompletionOutput, RequestMetrics
from aserve.sampling_params import SamplingParams


def observed(recorder, name):
    hist = recorder.histograms[name]
    cumulative, total = hist.snapshot()
    return cumulative[-1], total


def test_buckets_follow_vllms_1_2_5_series():
    assert buckets_1_2_5(100) == (1, 2, 5, 10, 20, 50, 100)
    assert buckets_1_2_5(4) == (1, 2)


def test_inter_token_latency_is_the_time_since_each_requests_own_last_token():
    rec = EngineStatsRecorder(2048)
    a = SimpleNamespace(metrics=RequestMetrics(arrival_time=0.0), prompt_token_ids=[1] * 40,
                        num_cached_tokens=32)
    b = SimpleNamespace(metrics=RequestMetrics(arrival_time=0.5), prompt_token_ids=[1] * 8,
                        num_cached_tokens=0)
    for now, got in ((1.0, (a, b)), (2.0, (a,)), (3.0, (a, b)), (3.5, (b,))):
        for request in got:
            rec.on_token(request, now)
        rec.on_step(len(got), now)
    # a: 1 -> 2 -> 3; b skipped the step at 2 (preempted, say): 1 -> 3 -> 3.5.
    assert observed(rec, "inter_token_latency_seconds") == (4, 1.0 + 1.0 + 2.0 + 0.5)
    assert observed(rec, "time_to_first_token_seconds") == (2, 1.0 + 0.5)
    assert observed(rec, "iteration_tokens_total") == (4, 6)
    # Each prompt counted once, at its first token, by where its KV came from.
    assert rec.prompt_tokens_by_source == {"local_compute": 8 + 8, "local_cache_hit": 32,
                                           "external_kv_transfer": 0}
    assert (rec.prompt_tokens_cached, rec.prompt_tokens_recomputed) == (32, 0)


def test_a_finished_request_reports_vllms_phases():
    rec = EngineStatsRecorder(2048)
    m = RequestMetrics(arrival_time=10.0, first_scheduled_time=10.5, first_token_time=11.0,
                       last_token_time=13.0, num_generation_tokens=5)
    seq = SimpleNamespace(finish_reason="length", num_output_tokens=5)
    request = SimpleNamespace(metrics=m, params=SamplingParams(n=1, max_tokens=5), error=None,
                              prompt_token_ids=[1] * 40, num_cached_tokens=32, seqs=[seq],
                              beam_outputs=None, num_preemptions=2)
    rec.on_finished(request, finish_reason_of(request), now=13.25)
    assert rec.finished_by_reason == {"length": 1}
    expected = {"e2e_request_latency_seconds": 3.25, "request_queue_time_seconds": 0.5,
                "request_prefill_time_seconds": 0.5, "request_decode_time_seconds": 2.0,
                "request_inference_time_seconds": 2.5, "request_time_per_output_token_seconds": 0.5,
                "request_prompt_tokens": 40, "request_generation_tokens": 5,
                "request_prefill_kv_computed_tokens": 8, "request_params_n": 1,
                "request_params_max_tokens": 5, "request_max_num_generation_tokens": 5,
                "request_num_preemptions": 2}
    for name, value in expected.items():
        assert observed(rec, name) == (1, value), name


def test_a_request_aborted_while_waiting_reports_no_phase_it_never_reached():
    rec = EngineStatsRecorder(2048)
    request = SimpleNamespace(metrics=RequestMetrics(arrival_time=1.0), params=SamplingParams(max_tokens=9),
                              error=None, prompt_token_ids=[1, 2], num_cached_tokens=None, seqs=[],
                              beam_outputs=None, num_preemptions=0)
    rec.on_finished(request, "abort", now=4.0)
    assert observed(rec, "e2e_request_latency_seconds") == (1, 3.0)
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds"):
        assert observed(rec, name) == (0, 0.0), name


def test_finish_reason_of_a_beam_search_comes_from_its_final_beams():
    beams = [CompletionOutput(index=0, text="", token_ids=[1], cumulative_logprob=0.0, logprobs=None,
                              finish_reason="length")]
    request = SimpleNamespace(error=None, seqs=[], beam_outputs=beams)
    assert finish_reason_of(request) == "length"
    assert finish_reason_of(SimpleNamespace(error="boom", seqs=[], beam_outputs=None)) == "error"
