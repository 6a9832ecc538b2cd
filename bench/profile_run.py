"""Where a whole offline run's GPU time goes, by kind of step and by kind of kernel.

    python bench/profile_run.py [--workload B] [--num-prompts 1000] [--window 200:320]

Runs workload A or B of bench/workloads.py (random weights, the engine's defaults) through the
engine, step by step, and reports:
- every step of the run by kind: prefill (prompt tokens only), mixed (prompt chunks and decodes
  together, chunked prefill) and decode (one token per sequence), with their counts and tokens;
- for the steps of --window (step indices start:stop; a torch.profiler window, since the whole
  run's kernels would be millions of events): GPU time per step of each kind, and the kernels
  grouped by what they do (matmul, prompt attention, decode attention, KV write, norm, ...);
- the run's wall time against the GPU time its steps would take at the window's rates, which
  is what the host and the gaps between steps cost;
- with --host, the window's host side: the launch's CPU time per step of each kind, and the
  torch ops and CUDA runtime calls with the most CPU time of their own (a cudaStreamSynchronize
  or cudaEventSynchronize there is the host waiting for the GPU).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from aserve import EngineArgs, SamplingParams  # noqa: E402
from aserve.engine.engine import Engine  # noqa: E402
from workloads import MODEL_DTYPES, hf_config, prompts_for, workload  # noqa: E402

# First match wins; names are CUDA kernel names as the profiler reports them.
KERNEL_GROUPS = [
    ("prompt attention", r"flash|fmha|attention_fwd"),
    ("decode attention", r"paged_decode"),
    ("KV write", r"reshape_and_cache"),
    ("matmul", r"gemm|gemv|nvjet|cutlass|sm90_xmma|sm80_xmma|splitKreduce|cublas"),
    ("norm", r"rms_norm|layer_norm|LayerNorm"),
    ("rotary", r"rotary"),
    ("activation", r"silu|gelu|relu|act_and_mul"),
    ("sampling", r"softmax|topk|sort|exponential|argmax|multinomial|cumsum|radix|log_softmax"),
    ("gather / scatter", r"index|gather|scatter"),
    ("copies", r"copy|Memcpy|Memset|fill"),
    ("elementwise", r"elementwise|vectorized|reduce_kernel"),
]


def kernel_group(name: str) -> str:
    for group, pattern in KERNEL_GROUPS:
        if re.search(pattern, name, re.IGNORECASE):
            return group
    return "other"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_kind(model_input) -> str:
    lens = model_input.attn_metadata.query_lens_cpu
    if max(lens) == 1:
        return "decode"
    return "mixed" if min(lens) == 1 else "prefill"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["A", "B"], default="B")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--window", default="200:320", help="profiled steps, start:stop")
    p.add_argument("--top", type=int, default=25, help="kernels listed")
    p.add_argument("--tiny", action="store_true", help="2-layer models (a smoke test, also on the CPU)")
    p.add_argument("--host", action="store_true", help="also the window's host time by op")
    p.add_argument("--runs", type=int, default=1,
                   help="the workload this many times, each with prompts of its own, the last one profiled: "
                        "whether the first run's steps pay for kernels loaded on first use")
    args = p.parse_args()
    w = workload(args.workload, args.tiny, args.num_prompts)
    window_start, window_stop = (int(x) for x in args.window.split(":"))

    folder = tempfile.mkdtemp(prefix="aserve-profile-run-")
    hf_config(w.model, tiny=args.tiny).save_pretrained(folder)
    cuda = torch.cuda.is_available()
    engine = Engine(EngineArgs(model=folder, load_format="dummy", skip_tokenizer_init=True,
                               dtype=MODEL_DTYPES[w.model] if cuda else "float32", gpu_memory_utilization=0.9, seed=0,
                               max_model_len=2048 if w.model == "opt" else 131072))
    sched = engine.scheduler_config
    print(f"workload {w.name}: {w.num_prompts} x ({w.prompt_len} in, {w.output_len} out); "
          f"max_num_seqs {sched.max_num_seqs}, max_num_batched_tokens {sched.max_num_batched_tokens}")

    # Every step the runner starts (launched ahead or run synchronously) is tagged with its kind.
    kinds: list[tuple[str, int, int]] = []   # per step: kind, prompt tokens, decode sequences
    runner = engine.runner

    def tagged(method):
        def run(model_input, *rest):
            kind = step_kind(model_input)
            lens = model_input.attn_metadata.query_lens_cpu
            decodes = sum(1 for q in lens if q == 1)
            kinds.append((kind, model_input.attn_metadata.num_tokens - decodes, decodes))
            with record_function(f"step {kind}"):
                return method(model_input, *rest)
        return run

    runner.launch, runner.execute = tagged(runner.launch), tagged(runner.execute)

    params = SamplingParams(temperature=0.0 if w.greedy else 1.0, top_p=1.0, top_k=-1,
                            max_tokens=w.output_len, ignore_eos=True)
    for prompt in prompts_for(w, seed=1)[:32]:  # warm-up, on prompts the run does not have
        engine.add_request(None, prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    kinds.clear()

    for run in range(args.runs - 1):   # earlier runs: their prompts neither the warm-up's nor the last's
        started = time.perf_counter()
        for prompt in prompts_for(w, seed=2 + run):
            engine.add_request(None, prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
        sync()
        print(f"run {run + 1} of {args.runs} (not profiled): {w.num_prompts * w.output_len / (time.perf_counter() - started):,.0f} "
              f"out tok/s")
    kinds.clear()
    for prompt in prompts_for(w):
        engine.add_request(None, prompt, params)
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    window_wall = 0.0
    sync()
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        if steps == window_start:
            sync()
            prof.start()
            window_t0 = time.perf_counter()
        engine.step()
        steps += 1
        if steps == window_stop:
            sync()
            window_wall = time.perf_counter() - window_t0
            prof.stop()
    sync()
    wall = time.perf_counter() - start
    if window_start < steps < window_stop:  # the run ended inside the window: it ends there
        window_wall = time.perf_counter() - window_t0
        window_stop = steps
        prof.stop()
    out_tokens = w.num_prompts * w.output_len
    print(f"run: {wall:.2f} s, {out_tokens / wall:,.0f} out tok/s, {steps} engine steps, "
          f"{len(kinds)} model steps")

    counts = collections.Counter(k for k, _, _ in kinds)
    prompt_tokens = collections.Counter()
    decode_rows = collections.Counter()
    for kind, prompt, decodes in kinds:
        prompt_tokens[kind] += prompt
        decode_rows[kind] += decodes
    # The window's model steps: those started while it ran (launches run one step ahead).
    window_kinds = kinds[window_start:window_stop]
    window_counts = collections.Counter(k for k, _, _ in window_kinds)
    if not window_wall:
        print("the run ended before the window began: no profile")
        return

    events = prof.key_averages()
    step_gpu = {e.key.removeprefix("step "): e.device_time_total / 1e3 for e in events
                if e.key.startswith("step ")}
    print(f"\n{'step kind':10s} {'steps':>6s} {'prompt tok':>11s} {'decode rows':>12s} "
          f"{'in window':>9s} {'GPU ms/step':>11s} {'est. GPU s':>10s}")
    estimate = 0.0
    for kind in ("prefill", "mixed", "decode"):
        per_step = step_gpu.get(kind, 0.0) / max(1, window_counts[kind])
        est = per_step * counts[kind] / 1e3 if window_counts[kind] else float("nan")
        if window_counts[kind]:
            estimate += est
        print(f"{kind:10s} {counts[kind]:6d} {prompt_tokens[kind]:11d} {decode_rows[kind]:12d} "
              f"{window_counts[kind]:9d} {per_step:11.2f} {est:10.2f}")
    print(f"run wall {wall:.2f} s; GPU time estimated from the window's rates {estimate:.2f} s "
          "(kinds absent from the window not counted)")

    if args.host:
        print_host_table(events, window_counts, args.top)

    # The step annotations have a GPU-side range too; they are not kernels.
    kernels = [e for e in events if e.device_type.name == "CUDA" and not e.key.startswith("step ")]
    if not kernels:
        print("no GPU kernels in the window (a run on the CPU)")
        return
    busy = sum(e.self_device_time_total for e in kernels) / 1e3
    print(f"\nwindow: steps {window_start}-{window_stop}, wall {window_wall * 1e3:.1f} ms, "
          f"GPU busy {busy:.1f} ms ({100 * busy / (window_wall * 1e3):.1f}%)")
    groups = collections.Counter()
    for e in kernels:
        groups[kernel_group(e.key)] += e.self_device_time_total / 1e3
    for group, ms in groups.most_common():
        print(f"  {group:18s} {ms:9.1f} ms  {100 * ms / busy:5.1f}%")
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    print(f"\n{'kernel':96s} {'ms':>8s} {'calls':>7s} {'us/call':>8s}")
    for e in kernels[:args.top]:
        ms = e.self_device_time_total / 1e3
        print(f"{e.key[:96]:96s} {ms:8.1f} {e.count:7d} {1e3 * ms / max(1, e.count):8.1f}")
    engine.shutdown()


def print_host_table(events, window_counts: collections.Counter, top: int) -> None:
    """The window's host time: each step kind's launch (forward and sampling enqueued), then the
    ops and runtime calls with the most CPU time of their own."""
    print(f"\n{'launch, host':14s} {'steps':>6s} {'CPU ms/step':>11s}")
    for e in events:
        if e.key.startswith("step ") and e.device_type.name == "CPU":
            kind = e.key.removeprefix("step ")
            print(f"{kind:14s} {e.count:6d} {e.cpu_time_total / 1e3 / max(1, e.count):11.3f}")
    cpu = sorted((e for e in events if e.device_type.name == "CPU" and not e.key.startswith("step ")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)
    steps = max(1, sum(window_counts.values()))
    print(f"\n{'host op (self CPU time)':60s} {'ms/step':>8s} {'calls/step':>10s} {'us/call':>8s}")
    for e in cpu[:top]:
        ms = e.self_cpu_time_total / 1e3
        print(f"{e.key[:60]:60s} {ms / steps:8.3f} {e.count / steps:10.1f} {1e3 * ms / max(1, e.count):8.1f}")


if __name__ == "__main__":
    main()
