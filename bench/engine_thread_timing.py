"""Where the engine's thread spends a step, offline and served: wall time and the thread's own
CPU time per phase, so that what the thread does (CPU) and what it waits for (the GIL, the
GPU) come apart.

    python bench/engine_thread_timing.py offline MODEL [--num-prompts 1000] [--input-len 128]
        [--output-len 128] [--vocab 30000] [--load-format dummy] [--skip-tokenizer-init]
    python bench/engine_thread_timing.py server [python -m aserve's arguments ...]
    (--detail anywhere: also the parts of launch and of the step's tensors)
    (--stand-in-model anywhere: no model work; each launched step's ids are ready at once)
    (--timeline anywhere: also when requests arrived and how full the steps were over the run)
    (--stand-in-gpu BASE_MS,ROW_US,TOKEN_US,EAGER_MS with --stand-in-model: a modelled GPU's
     step times and the eager prompt steps' host work, see _stand_in_gpu)
    (server with an engine process, the default on a CUDA device: the timers and the stand-in
     go into the engine process, which prints its table when it ends)

offline: model A's workload through OfflineLLM.generate (random token ids, sampling at
temperature 1, ignore_eos), timed after a warm-up. server: `python -m aserve` with the same
timers on its engine thread; the table is printed when the engine thread stops (SIGINT the
server after the benchmark; bench/server_vs_offline.sh with ENGINE_TIMING=1 does both).

Each phase's line gives, per step: its wall time, the thread's CPU time in it
(time.thread_time) and how many calls a step makes. Offline the two are nearly equal; served,
wall minus CPU is time the engine thread waited, mostly for the GIL the event loop held. The
phases nest: schedule includes model_input (the step's tensors to the device); step includes
schedule, launch (forward and sampling enqueued), gpu wait and process.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import aserve.engine.async_engine as async_engine  # noqa: E402
import aserve.engine.engine as engine_module  # noqa: E402
import aserve.engine.engine_driver as engine_driver  # noqa: E402
import aserve.engine.engine_ops as engine_ops  # noqa: E402
import aserve.worker.model_runner as model_runner  # noqa: E402

_totals: collections.Counter = collections.Counter()


def _timed(owner, name: str, phase):
    """Replace owner.name by a wrapper that adds its wall and CPU time to phase's totals
    (phase: a name, or a function of the call's arguments that names it)."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            name = phase if isinstance(phase, str) else phase(*args)
            _totals[(name, "wall")] += time.perf_counter() - wall
            _totals[(name, "cpu")] += time.thread_time() - cpu
            _totals[(name, "calls")] += 1

    setattr(owner, name, wrapper)
    return wrapper


def _install_detail_timers() -> None:
    """--detail: the parts of launch and schedule (nested in them; each timer costs ~1 us)."""
    import aserve.worker.cuda_graphs as cuda_graphs
    import aserve.worker.input_upload as input_upload
    import aserve.worker.sampler as sampler

    for owner, name, phase in [
            (model_runner.ModelRunner, "_forward", _forward_phase),
            (cuda_graphs.DecodeGraphs, "run", "    graph run"),
            (sampler.Sampler, "sample_ids", "  sample_ids"),
            (sampler.Sampler, "_row_keys", "    row keys"),
            (model_runner.PendingStep, "start", "  ids to host"),
            (input_upload.InputUploader, "upload", "  upload")]:
        _timed(owner, name, phase)


def _forward_phase(runner, model_input, *_) -> str:
    """The forward's phase by its step's kind: decode steps replay CUDA graphs, steps with
    prompt tokens run the model eagerly (op by op: on the H200 ~7-10 ms of host time at 8k
    tokens of model A, against ~3.5 ms of GPU)."""
    if max(model_input.attn_metadata.query_lens_cpu, default=1) == 1:
        return "  forward decode"
    return "  forward prompts"


def _install_stand_in_model() -> None:
    """--stand-in-model: ModelRunner.launch runs no model and returns ids at once (a cycle
    through the word ids of bench/make_random_model.py's tokenizers), so that a step costs only
    the engine's and the server's host work: offline against served, this is the server goal's
    ratio (issue 11) of a host whose GPU takes no time. The steps still build their inputs;
    requests that need the model's numbers (logprobs, beams) are not supported."""
    import torch

    next_id = [0]
    gpu = _stand_in_gpu()
    gpu_free_at = [0.0]

    def launch(self, model_input, previous):
        rows = model_input.num_sample_rows
        start = next_id[0]
        next_id[0] = (start + rows) % 3000
        ids = torch.arange(start, start + rows, dtype=torch.long) % 3000 + 300
        pending = model_runner.PendingStep.start(ids)
        if gpu is not None:
            base_ms, row_us, token_us, eager_ms = gpu
            num_tokens = int(model_input.attn_metadata.num_tokens)
            if num_tokens > rows and eager_ms:   # prompt tokens: an eager forward, the GIL held
                spin_until = time.perf_counter() + eager_ms / 1e3
                while time.perf_counter() < spin_until:
                    pass
            busy_s = (base_ms + rows * row_us / 1e3 + max(0, num_tokens - rows) * token_us / 1e3) / 1e3
            gpu_free_at[0] = max(time.perf_counter(), gpu_free_at[0]) + busy_s
            pending.stand_in_done_at = gpu_free_at[0]
        return pending

    model_runner.ModelRunner.launch = launch
    if gpu is not None:
        original_result = model_runner.PendingStep.result

        def result(self):
            wait = getattr(self, "stand_in_done_at", 0.0) - time.perf_counter()
            if wait > 0:
                time.sleep(wait)   # as a wait on the device: the GIL is free meanwhile
            return original_result(self)

        model_runner.PendingStep.result = result


def _stand_in_gpu():
    """--stand-in-gpu BASE_MS,ROW_US,TOKEN_US,EAGER_MS (with --stand-in-model): each step also
    keeps a modelled GPU busy for BASE_MS + ROW_US a sampled row + TOKEN_US a prompt token (its
    result waits for that, the GIL free, as a wait on the device does; steps queue on the one
    GPU), and a step with prompt tokens first holds the GIL for EAGER_MS (the eager forward's
    host work; decode steps replay graphs). None without the flag."""
    if "--stand-in-gpu" not in sys.argv:
        return None
    at = sys.argv.index("--stand-in-gpu")
    values = [float(v) for v in sys.argv[at + 1].split(",")]
    del sys.argv[at:at + 2]
    if len(values) != 4:
        sys.exit("--stand-in-gpu takes BASE_MS,ROW_US,TOKEN_US,EAGER_MS")
    return values


# --timeline: (time, running, waiting, tokens scheduled, of them prompt tokens) a schedule
_steps: list[tuple[float, int, int, int, int]] = []
# --timeline lists this many of the run's first steps one by one: how the engine ramps up while
# a burst comes in (each step's length, how full, how many prompt tokens).
RAMP_STEPS = 24
_arrivals: dict[str, list[float]] = {"handler entered": [], "add posted": []}


def _install_timeline() -> None:
    """--timeline: how a burst reaches the engine (served: each handler's first read of its
    request, each add submitted to the engine) and how full its steps were over the run."""
    original_schedule = engine_module.Engine.schedule

    def schedule(self, *args, **kwargs):
        started, running, waiting = time.perf_counter(), len(self.scheduler.running), len(self.scheduler.waiting)
        plan = original_schedule(self, *args, **kwargs)
        tokens = plan.sched.num_batched_tokens
        prompt_tokens = sum(s.num_new_tokens for s in plan.sched.scheduled if s.num_new_tokens > 1)
        _steps.append((started, running, waiting, tokens, prompt_tokens))
        return plan

    engine_module.Engine.schedule = schedule
    original_submit = engine_driver.EngineDriver.submit

    def submit(self, *args, **kwargs):
        _arrivals["add posted"].append(time.perf_counter())
        return original_submit(self, *args, **kwargs)

    engine_driver.EngineDriver.submit = submit   # both engines' (in-process, process)
    import aserve.server.api_chat as api_chat
    import aserve.server.api_generate as api_generate
    import aserve.server.api_openai as api_openai
    import aserve.server.app as app

    original_read = app.read_request

    async def read_request(*args, **kwargs):
        _arrivals["handler entered"].append(time.perf_counter())
        return await original_read(*args, **kwargs)

    for module in (app, api_openai, api_chat, api_generate):
        module.read_request = read_request


def _report_timeline() -> None:
    """Times in ms after the first arrival (served) or the first step (offline; and in an
    engine process, which sees no arrivals: the server process prints those, and both print t0
    on the one monotonic clock of the machine)."""
    entered = _arrivals["handler entered"]
    if not _steps and not entered:
        return
    t0 = entered[0] if entered else _steps[0][0]
    for label, times in _arrivals.items():
        if times:
            marks = [times[min(len(times) - 1, int(q * len(times)))] for q in (0.1, 0.25, 0.5, 0.75, 0.9)]
            print(f"=== timeline: {label}: {len(times)}; at 10/25/50/75/90%/last: "
                  + " / ".join(f"{(t - t0) * 1e3:.0f}" for t in marks + [times[-1]]) + " ms", flush=True)
    print(f"=== timeline: t0 (the first arrival, or step) at {t0:.4f} s of the monotonic clock"
          + (f"; the last step at {_steps[-1][0]:.4f}" if _steps else ""), flush=True)
    if not _steps:
        return
    span = _steps[-1][0] - _steps[0][0] or 1e-9
    print(f"=== timeline: steps by tenth of the run ({(_steps[0][0] - t0) * 1e3:.0f} to "
          f"{(_steps[-1][0] - t0) * 1e3:.0f} ms): steps, mean rows running, mean waiting", flush=True)
    for tenth in range(10):
        part = [s for s in _steps if tenth <= (s[0] - _steps[0][0]) / span * 10 < tenth + 1
                or (tenth == 9 and s is _steps[-1])]
        if part:
            print(f"  {tenth * 10:3d}-{tenth * 10 + 10:3d}%  {len(part):5d}  "
                  f"{sum(s[1] for s in part) / len(part):7.1f}  {sum(s[2] for s in part) / len(part):7.1f}",
                  flush=True)
    print(f"=== timeline: the first {min(RAMP_STEPS, len(_steps))} steps: ms at its start, ms to the "
          f"next, rows running, waiting, tokens, prompt tokens", flush=True)
    for (at, running, waiting, tokens, prompt_tokens), following in zip(_steps[:RAMP_STEPS], _steps[1:] + [None]):
        length = f"{(following[0] - at) * 1e3:7.1f}" if following else "      -"
        print(f"  {(at - t0) * 1e3:8.1f} {length} {running:5d} {waiting:5d} {tokens:6d} {prompt_tokens:6d}",
              flush=True)


def _install_timers() -> None:
    if "--detail" in sys.argv:
        sys.argv.remove("--detail")
        _install_detail_timers()
    for owner, name, phase in [
            (engine_module.Engine, "schedule", "schedule"),
            (model_runner.ModelRunner, "model_input", "model_input"),
            (model_runner.ModelRunner, "launch", "launch"),
            (model_runner.PendingStep, "result", "gpu wait"),
            (engine_module.Engine, "process", "process"),
            (engine_module.Engine, "take_unreported_outputs", "take outputs")]:
        _timed(owner, name, phase)
    # The engine's start steps a few throwaway requests on a GPU (aserve/engine/step_warmup.py,
    # ~0.2 s of first-use loads): not the run's, so what they cost is dropped once it is built.
    built = engine_module.Engine.__init__

    def init(self, *args, **kwargs):
        built(self, *args, **kwargs)
        _totals.clear()
        _steps.clear()

    engine_module.Engine.__init__ = init
    # Both modules call run_step_gen by the name they imported: one wrapper for both.
    step = _timed(async_engine, "run_step_gen", "step")
    engine_module.run_step_gen = step
    async_engine.apply_op = _timed(engine_ops, "apply_op", "apply op")


def _count_prompt_steps() -> None:
    """How many launched steps carry prompt tokens: on a GPU those run the model eagerly (op by
    op, ~6-10 ms of host time for model A on the H200), the others replay decode CUDA graphs."""
    original = model_runner.ModelRunner.launch

    def launch(self, model_input, *args, **kwargs):
        if max(model_input.attn_metadata.query_lens_cpu, default=1) > 1:
            _totals[("prompt steps", "count")] += 1
        return original(self, model_input, *args, **kwargs)

    model_runner.ModelRunner.launch = launch


def _report(label: str) -> None:
    steps = _totals[("step", "calls")] or 1
    print(f"=== {label}: {int(steps)} steps, {int(_totals[('prompt steps', 'count')])} of them with "
          f"prompt tokens; per step: wall ms, thread CPU ms, calls", flush=True)
    for phase in sorted({phase for phase, kind in _totals if kind != "count"}, key=lambda p: (p != "step", p.strip())):
        print(f"  {phase:17s} wall {_totals[(phase, 'wall')] / steps * 1e3:7.3f}  "
              f"cpu {_totals[(phase, 'cpu')] / steps * 1e3:7.3f}  "
              f"calls {_totals[(phase, 'calls')] / steps:5.2f}", flush=True)


def run_offline(argv: list[str]) -> None:
    import numpy as np

    from aserve import OfflineLLM, SamplingParams

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=30000, help="prompt ids are drawn from [100, vocab)")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--skip-tokenizer-init", action="store_true")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the engine's")
    p.add_argument("--kv-cache-memory-gb", type=float, default=None,
                   help="on the CPU: a cache as large as a GPU's, for the stand-in model's 512-row steps")
    args = p.parse_args(argv)
    limits = {k: v for k, v in (("max_num_seqs", args.max_num_seqs),
                                ("max_num_batched_tokens", args.max_num_batched_tokens),
                                ("kv_cache_memory_gb", args.kv_cache_memory_gb)) if v is not None}
    llm = OfflineLLM(model=args.model, load_format=args.load_format, skip_tokenizer_init=args.skip_tokenizer_init,
                     **limits)
    prompts = np.random.RandomState(0).randint(100, args.vocab, size=(args.num_prompts, args.input_len))
    params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
    warm_up = np.random.RandomState(1).randint(100, args.vocab, size=(32, args.input_len))  # not the run's
    llm.generate([{"prompt_token_ids": p} for p in warm_up.tolist()],
                 SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    _totals.clear()
    _steps.clear()
    started = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts.tolist()], params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    print(f"=== offline: {args.num_prompts * args.output_len / elapsed:.0f} output tok/s", flush=True)
    _report("offline")
    _report_timeline()
    llm.shutdown()


def run_server(argv: list[str]) -> None:
    from aserve.server.cli import main

    engine_loop = async_engine.AsyncEngine._engine_loop

    def timed_engine_loop(self, loop):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return engine_loop(self, loop)
        finally:
            print(f"=== the server's engine thread: {time.perf_counter() - wall:.2f} s, "
                  f"{time.thread_time() - cpu:.2f} s of CPU", flush=True)
            _report("server")
            _report_timeline()

    async_engine.AsyncEngine._engine_loop = timed_engine_loop
    sys.argv = ["aserve", *argv]
    main()


# The flags an engine process applies to itself (server --engine-process), through the environment.
_ENGINE_PROCESS_FLAGS_ENV = "ASERVE_TIMING_ENGINE_FLAGS"


def _time_engine_process(argv: list[str]) -> None:
    """server --engine-process: the timers (and the stand-in model) go into the engine's own
    process, which reports when it ends: spawn starts it from this script (as __mp_main__), at
    _engine_process_main, with this run's flags in the environment."""
    import json

    import aserve.engine.process_async_engine as process_async_engine

    flags = [f for f in ("--stand-in-model", "--detail", "--timeline") if f in sys.argv]
    if "--timeline" in sys.argv:   # the arrivals, here when the server ends
        import atexit
        atexit.register(_report_timeline)
    if "--stand-in-gpu" in sys.argv:
        at = sys.argv.index("--stand-in-gpu")
        flags += sys.argv[at:at + 2]
    os.environ[_ENGINE_PROCESS_FLAGS_ENV] = json.dumps(flags)
    process_async_engine.run_engine_process = _engine_process_main


def _engine_process_main(*args) -> None:
    import json

    import aserve.engine.engine_process as engine_process

    sys.argv = ["engine process", *json.loads(os.environ.get(_ENGINE_PROCESS_FLAGS_ENV, "[]"))]
    if "--stand-in-model" in sys.argv:
        _install_stand_in_model()
    if "--timeline" in sys.argv:
        _install_timeline()   # its steps (the arrivals' hooks are the server's)
    _count_prompt_steps()
    _install_timers()
    # What only an engine process does between steps: read the servers' ops (waiting for them
    # when it has nothing to step, also between a benchmark's runs), send each its outputs.
    _timed(engine_process, "_take_ops", "ops in (or idle)")
    _timed(engine_process._Client, "send_batch", "outputs sent")
    engine_process.run_step_gen = async_engine.run_step_gen   # the timed one
    engine_process.apply_op = async_engine.apply_op
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        engine_process.run_engine_process(*args)
    finally:
        print(f"=== the engine process: {time.perf_counter() - wall:.2f} s, {time.process_time() - cpu:.2f} s "
              f"of CPU", flush=True)
        _report("engine process")
        _report_timeline()


def _serves_through_an_engine_process(argv: list[str]) -> bool:
    """As the server will decide (aserve/server/cli.py): --engine-process or
    --no-engine-process, else an engine process on a CUDA device."""
    from aserve.config import EngineArgs
    from aserve.server.cli import engine_in_own_process

    flag = True if "--engine-process" in argv else False if "--no-engine-process" in argv else None
    device = argv[argv.index("--device") + 1] if "--device" in argv else "auto"
    return engine_in_own_process(flag, EngineArgs(device=device))


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("offline", "server"):
        sys.exit(__doc__)
    if sys.argv[1] == "server" and _serves_through_an_engine_process(sys.argv[2:]):
        _time_engine_process(sys.argv)   # before the flags below leave sys.argv
    if "--stand-in-model" in sys.argv:
        sys.argv.remove("--stand-in-model")
        _install_stand_in_model()
    if "--timeline" in sys.argv:
        sys.argv.remove("--timeline")
        _install_timeline()
    _count_prompt_steps()
    _install_timers()
    (run_offline if sys.argv[1] == "offline" else run_server)(sys.argv[2:])


if __name__ == "__main__":
    main()
