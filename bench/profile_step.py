"""Where a decode step's time goes: host time per engine phase, and the GPU kernels.

    python bench/profile_step.py [--model llama|opt] [--batch 1] [--context 128] [--steps 32]
                                 [--async-scheduling] [--chain]

Builds model B (Llama-3.1-8B shape, bf16) or A (OPT-125m shape, fp16) of bench/workloads.py with
dummy weights, starts --batch requests of --context prompt tokens, and once they decode,
times --steps steps: host milliseconds in schedule / execute / process (execute includes the
wait for the GPU), then a torch.profiler table of the GPU kernels over the same number of steps.
Steps run synchronously here (async_scheduling off), so each phase can be timed on its own;
with --async-scheduling (the engine's default) the host phases overlap the GPU and only the
wall time per step and the kernel table are printed. --chain adds the step's wall time split
along its chain of kernels (print_chain): under programmatic dependent launch the kernel table's
durations overlap, and only this split says what each kernel adds to a step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from aserve import EngineArgs, SamplingParams  # noqa: E402
from aserve.engine.engine import Engine  # noqa: E402
from workloads import MODEL_DTYPES, hf_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["llama", "opt"], default="llama")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--async-scheduling", action="store_true",
                   help="profile the engine's pipelined steps (no per-phase host times)")
    p.add_argument("--no-gemv", action="store_true", help="decode matmuls in cuBLAS, not aserve's GEMV")
    p.add_argument("--chain", action="store_true",
                   help="also split the step's wall time by kernel along the chain (end-to-end deltas)")
    args = p.parse_args()
    if args.no_gemv:
        from aserve.models.layers import linear

        linear.USE_GEMV = False

    folder = tempfile.mkdtemp(prefix="aserve-profile-")
    hf_config(args.model, tiny=False).save_pretrained(folder)
    engine = Engine(EngineArgs(model=folder, load_format="dummy", skip_tokenizer_init=True,
                               dtype=MODEL_DTYPES[args.model],
                               # OPT-125m has 2048 positions; Llama's 4096 as in workloads.py.
                               max_model_len=2048 if args.model == "opt" else 4096,
                               enforce_eager=args.enforce_eager,
                               # Phases are timed one after another only in synchronous steps.
                               async_scheduling=args.async_scheduling))
    prompts = np.random.RandomState(0).randint(100, 30000, size=(args.batch, args.context)).tolist()
    # Every prompt's prefill (in steps of max_num_batched_tokens), then a few decode steps; the
    # requests then decode through the timed steps and the profiled ones.
    warm_up_steps = -(-args.batch * args.context // engine.scheduler_config.max_num_batched_tokens) + 8
    max_tokens = warm_up_steps + 2 * args.steps
    if args.context + max_tokens > engine.model_config.max_model_len:
        raise SystemExit(f"--context {args.context} and --steps {args.steps} need {args.context + max_tokens} "
                         f"positions; the model has {engine.model_config.max_model_len}")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(None, prompt, params)
    for _ in range(warm_up_steps):
        engine.step()

    if args.async_scheduling:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        print(f"wall ms per decode step (pipelined, batch {args.batch}): "
              f"{(time.perf_counter() - start) * 1e3 / args.steps:.3f}")
    phases = {"schedule": [], "execute": [], "process": []}
    for _ in range(0 if args.async_scheduling else args.steps):
        t0 = time.perf_counter()
        plan = engine.schedule()
        t1 = time.perf_counter()
        output = engine.execute(plan)
        t2 = time.perf_counter()
        engine.process(plan, output)
        t3 = time.perf_counter()
        for name, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            value *= 1e3
            phases[name].append(value)
    if not args.async_scheduling:
        total = sum(statistics.median(v) for v in phases.values())
        print(f"host ms per decode step (median of {args.steps}, batch {args.batch}): "
              + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in phases.items()) + f", total {total:.3f}")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    gpu_total = sum(e.self_device_time_total for e in events) / 1e3 / args.steps
    print(f"GPU busy ms per step: {gpu_total:.3f}")
    print(f"{'kernel':90s} {'ms/step':>8s} {'calls/step':>10s}")
    for e in events[:30]:
        print(f"{e.key[:90]:90s} {e.self_device_time_total / 1e3 / args.steps:8.3f} {e.count / args.steps:10.1f}")
    if args.chain:
        print_chain(prof, args.steps)


def print_chain(prof, steps: int, out=print) -> None:
    """The profiled steps' wall time split along the chain of kernels: each kernel is charged
    the time from the end of the GPU work before it to its own end, and is named with the
    kernel before it (so the GEMV after a norm and the one after attention stay apart). A
    decode step is a chain in which every kernel waits for the one before, so these deltas and
    the GPU's idle gaps add up to the wall time. Under programmatic dependent launch a kernel's
    own duration also counts the time it sat resident waiting; the delta is what it added."""
    from torch.autograd import DeviceType

    work = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.end)
    if not work:
        return
    charged: dict[str, list[float]] = {}
    idle_at: dict[str, list[float]] = {}   # the idle gaps by the pair of operations around them
    for before, event in zip(work, work[1:]):
        name = f"{before.name[:28]} > {event.name[:28]}"
        idle = event.time_range.start - before.time_range.end
        if idle > 0:   # nothing ran: the GPU waited for the host, or for the next operation to start
            charged.setdefault("(GPU idle)", []).append(idle)
            idle_at.setdefault(name, []).append(idle)
        start = max(before.time_range.end, event.time_range.start)
        charged.setdefault(name, []).append(max(0.0, event.time_range.end - start))
    total = sum(sum(v) for v in charged.values())
    out(f"chain: {total / 1e3 / steps:.3f} ms per step from the first kernel's end to the last's; by kernel "
        f"(ms per step, calls, us per call):")
    for name, deltas in sorted(charged.items(), key=lambda kv: -sum(kv[1])):
        out(f"  {name:60s} {sum(deltas) / 1e3 / steps:8.3f} {len(deltas) / steps:6.1f} "
            f"{sum(deltas) / len(deltas):7.2f}")
    # Where the idle time sits: a gap at every copy of a step's inputs points at the copies'
    # own start-up, one large gap at the step's start at the host.
    out("idle gaps by where they fall (ms per step, gaps per step, us per gap):")
    for name, gaps in sorted(idle_at.items(), key=lambda kv: -sum(kv[1]))[:12]:
        out(f"  {name:60s} {sum(gaps) / 1e3 / steps:8.3f} {len(gaps) / steps:6.1f} {sum(gaps) / len(gaps):7.2f}")


if __name__ == "__main__":
    main()
