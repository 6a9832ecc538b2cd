"""The benchmark scripts that GPU calls run, run small on the CPU: a script that fails on the card
costs a call of a scarce budget, so each is smoke-tested here, through its command line."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

from tiny_models import tiny_model_dir

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_no_bench_script_hides_an_installed_package():
    """A script's folder comes first on sys.path, so a script named as a package that the code it
    imports needs shadows that package (transformers 5.25 imports `kernels`, which
    bench/kernels.py hid until it was renamed)."""
    installed = set(importlib.metadata.packages_distributions())
    scripts = {name[:-3] for name in os.listdir(BENCH) if name.endswith(".py")}
    assert not scripts & installed, scripts & installed


def test_workloads_reports_latency_runs_and_their_median():
    out = _run(os.path.join(BENCH, "workloads.py"), "--tiny", "--workloads", "A1,A", "--latency-runs", "3")
    lines = [json.loads(line) for line in out.splitlines() if line.startswith('{"workload"')]
    a1 = next(r for r in lines if r["workload"] == "A1" and r["system"] == "aserve")
    runs = a1["runs_ms_per_output_token"]
    assert len(runs) == 3 and a1["ms_per_output_token"] == sorted(runs)[1]
    assert any(r["workload"] == "A" and r["output_tokens_per_s"] > 0 for r in lines)
    assert "| A1 |" in out and "| A |" in out   # the closing table


def test_engine_thread_timing_prints_each_phase_per_step():
    out = _run(os.path.join(BENCH, "engine_thread_timing.py"), "offline", tiny_model_dir("opt"),
               "--num-prompts", "8", "--input-len", "8", "--output-len", "4", "--vocab", "500",
               "--load-format", "auto", "--detail")
    phases = {line.split()[0] for line in out.splitlines() if " wall " in line and " cpu " in line}
    assert {"step", "schedule", "model_input", "launch", "process", "forward", "sample_ids"} <= phases
    assert "output tok/s" in out


def test_engine_thread_timing_with_the_stand_in_model_runs_no_model():
    """--stand-in-model: the run completes with every phase of a step timed, and the model's
    forward never runs."""
    out = _run(os.path.join(BENCH, "engine_thread_timing.py"), "offline", tiny_model_dir("opt"),
               "--num-prompts", "8", "--input-len", "8", "--output-len", "4", "--vocab", "500",
               "--load-format", "auto", "--detail", "--stand-in-model")
    phases = {line.split()[0] for line in out.splitlines() if " wall " in line and " cpu " in line}
    assert {"step", "schedule", "launch", "process"} <= phases and "forward" not in phases
    assert "output tok/s" in out


def test_engine_thread_timing_models_a_gpus_step_times():
    """--stand-in-gpu: each step waits for its modelled GPU time (the GIL free), so a run of
    n steps takes at least n times the base time; steps with prompt tokens are counted."""
    out = _run(os.path.join(BENCH, "engine_thread_timing.py"), "offline", tiny_model_dir("opt"),
               "--num-prompts", "8", "--input-len", "8", "--output-len", "6", "--vocab", "500",
               "--load-format", "auto", "--stand-in-model", "--stand-in-gpu", "20,0,0,5",
               "--max-num-seqs", "8")
    step_line = next(line for line in out.splitlines() if line.strip().startswith("step "))
    assert float(step_line.split()[2]) >= 19.0   # wall ms a step: the modelled GPU's 20 ms
    header = next(line for line in out.splitlines() if "steps," in line)
    assert "1 of them with prompt tokens" in header


def test_engine_thread_timing_timeline_lists_the_first_steps():
    """--timeline: the run's first steps one by one, their tokens as scheduled: 8 prompts of 8
    tokens all go in the first step (64 prompt tokens), then 8 rows of one token a step."""
    out = _run(os.path.join(BENCH, "engine_thread_timing.py"), "offline", tiny_model_dir("opt"),
               "--num-prompts", "8", "--input-len", "8", "--output-len", "4", "--vocab", "500",
               "--load-format", "auto", "--timeline")
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if "the first" in line and "prompt tokens" in line)
    rows = [line.split() for line in lines[at + 1:at + 5]]
    tokens = [(int(r[4]), int(r[5])) for r in rows]
    assert tokens[0] == (64, 64) and tokens[1:] == [(8, 0)] * 3, tokens
    assert float(rows[1][0]) > float(rows[0][0]) and float(rows[0][1]) > 0   # times, ms after t0


def test_engine_process_burst_streams_every_token_through_the_served_engine():
    """The served engine without HTTP: every request's tokens arrive, in the engine process (with
    the timers' table and the stand-in model there) and in this process's engine thread."""
    script = os.path.join(BENCH, "engine_process_burst.py")
    # 40-token prompts fill two 16-token blocks: a prompt sent again would be served by the cache.
    common = ("--num-prompts", "8", "--input-len", "40", "--output-len", "4", "--load-format", "auto")
    out = _run(script, tiny_model_dir("opt"), *common, "--spread-ms", "0,20", "--timers", "--stand-in-model")
    runs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["spread_ms"] for r in runs] == [0, 20]
    assert all(r["engine"] == "engine process" and r["output_tokens"] == 32 and r["steps"] > 0
               for r in runs), runs
    assert [r["cached_prompt_tokens"] for r in runs] == [0, 0]   # each run's prompts its own
    assert "=== engine process:" in out and "take outputs" in out   # the timers ran there
    assert "ops in (or idle)" in out and "outputs sent" in out     # and what only it does
    out = _run(script, tiny_model_dir("opt"), *common, "--in-process")
    (run,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert run["engine"] == "in-process" and run["output_tokens"] == 32 and run["ttft_mean_ms"] > 0


def test_profile_run_reports_steps_by_kind_and_the_host_ops():
    out = _run(os.path.join(BENCH, "profile_run.py"), "--workload", "A", "--tiny", "--num-prompts", "12",
               "--window", "0:20", "--host", "--top", "5")
    assert "decode" in out and "run wall" in out
    host = out[out.index("host op (self CPU time)"):].splitlines()[1:6]
    assert len(host) == 5 and all(float(line.split()[-1]) >= 0 for line in host), host   # us/call
    assert "launch, host" in out


def test_profile_start_times_each_start_and_profiles_the_last():
    out = _run(os.path.join(BENCH, "profile_start.py"), "--model", "opt", "--tiny", "--starts", "2", "--top", "5")
    starts = [line for line in out.splitlines() if line.startswith("start ")]
    assert [line.split(":")[0] for line in starts] == ["start 1", "start 2"]
    assert all(float(line.split("engine start ")[1].split()[0]) > 0 for line in starts)
    assert "by cumulative time" in out and "engine.py" in out and "build_model_runner" in out


def test_profile_step_chain_charges_each_kernel_from_the_end_before_it(monkeypatch):
    """profile_step.py --chain (its profile needs a GPU; the split is checked on stand-in
    events): every kernel is charged from the end of the work before it, under the name of
    that pair, and the GPU's idle gaps apart, so the parts add up to the span of the steps."""
    import importlib.util
    import types

    from torch.autograd import DeviceType

    monkeypatch.syspath_prepend(BENCH)   # as when it runs as a script: its sibling workloads.py
    spec = importlib.util.spec_from_file_location("profile_step", os.path.join(BENCH, "profile_step.py"))
    profile_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_step)

    def kernel(name, start, end):
        return types.SimpleNamespace(name=name, device_type=DeviceType.CUDA,
                                     time_range=types.SimpleNamespace(start=start, end=end))

    # norm, then a GEMV launched early (PDL) that ends at 10, attention overlapping it, a GEMV,
    # an idle gap of 5 (the host), a norm; and a host event that must not count.
    host = types.SimpleNamespace(name="cpu op", device_type=DeviceType.CPU,
                                 time_range=types.SimpleNamespace(start=0, end=99))
    events = [kernel("norm", 0, 3), kernel("gemv", 1, 10), kernel("attn", 8, 14), kernel("gemv", 12, 20),
              kernel("norm", 25, 27), host]
    lines = []
    profile_step.print_chain(types.SimpleNamespace(events=lambda: events), 1, out=lines.append)
    gaps_at = lines.index("idle gaps by where they fall (ms per step, gaps per step, us per gap):")
    charged = {line.rsplit(None, 3)[0].strip(): float(line.split()[-1]) for line in lines[1:gaps_at]}
    assert charged == {"norm > gemv": 7.0, "gemv > attn": 4.0, "attn > gemv": 6.0, "(GPU idle)": 5.0,
                       "gemv > norm": 2.0}
    assert lines[0].startswith("chain: 0.024 ms per step")
    # The one gap, named by the operations around it.
    assert [line.rsplit(None, 3)[0].strip() for line in lines[gaps_at + 1:]] == ["gemv > norm"]
    assert float(lines[-1].split()[-1]) == 5.0


def test_ratio_summary_gives_each_servers_ratio_and_latency_ranges():
    """bench/ratio_summary.py on a server_vs_offline.sh log: each served run against its round's
    offline run with a tokenizer, each variant's mean against the offline mean, and the ranges
    of its runs' TTFT, TPOT and ITL means."""
    served = ("=== server A, {label}, rate inf, 1000 prompts: Failed requests 0 Output token throughput "
              "(tok/s) {tps} Client CPU (cores busy) 0.60 MEAN (ms) {ttft} P50 (ms) 1.0 P99 (ms) 2.0 "
              "MEAN (ms) {tpot} P50 (ms) 1.0 P99 (ms) 2.0 MEAN (ms) {itl} P50 (ms) 1.0 P99 (ms) 2.0")
    log = "\n".join([
        '=== offline A, no tokenizer: {"output_tokens_per_s": 150000.0}',
        '=== offline A, with a tokenizer: {"output_tokens_per_s": 100000.0}',
        served.format(label="previous version", tps=80000.0, ttft=500.0, tpot=3.0, itl=20.0),
        '=== offline A, with a tokenizer, round 2: {"output_tokens_per_s": 120000.0}',
        served.format(label="previous version", tps=90000.0, ttft=450.0, tpot=3.5, itl=25.0),
    ]) + "\n"
    result = subprocess.run([sys.executable, os.path.join(BENCH, "ratio_summary.py")], input=log,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ("=== summary: offline A with a tokenizer, 2 run(s): 100,000, 120,000; "
                        "mean 110,000 out tok/s")
    assert lines[1] == ("    previous version: 80,000 (0.80x), 90,000 (0.75x); mean 85,000, 0.77x the offline "
                        "mean; TTFT 450.0-500.0, TPOT 3.0-3.5, ITL 20.0-25.0 ms (each run's mean)")
