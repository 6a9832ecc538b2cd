"""The served engine without HTTP: model A's burst handed straight to the server's engine driver,
to tell what the engine process (or the in-process engine thread) costs from what the HTTP
server and its clients cost (issue 11's server goal, bench/server_vs_offline.sh).

    python bench/engine_process_burst.py MODEL [--num-prompts 1000] [--input-len 128]
        [--output-len 128] [--spread-ms 0,200] [--in-process] [--load-format dummy]
        [--timers [--stand-in-model]]

The engine is built as `python -m aserve` builds it (usage context api_server, placed in its own
process unless --in-process), on a uvloop loop with the server's collector settings. Each request
is submitted in the loop's turn as an HTTP handler submits it (EngineDriver.submit), streamed
(DELTA outputs, greedy, ignore_eos) and read to its end by a task of its own; each run has
random prompts of its own (none cached by an earlier run). --spread-ms: the
burst's submissions spread evenly over that many ms (a list: one run each), as an HTTP server
takes a burst in over a few hundred ms (bench/RESULTS.md: the handlers saw the last of 1000
requests 190-400 ms after the first). Prints one JSON line per run: out tok/s from the first
submission to the last token, TTFT mean and p50, the engine's steps and the prompt tokens the
prefix cache served (0 but for the prompts' random repeats).

Two ways it differs from a server: with no chunks to write, the driver's rest after a delivery
is short, so it asks the engine for outputs more often (every ~4 steps on the CPU VM's stand-in
model; a server under this load every ~10: ITL ~35 ms against TPOT ~3.4 ms on an H100), and the
engine process's output work (Engine.take_unreported_outputs, the wire encoding, the pipe) is a
larger share here; and a fresh engine's first burst is slower than its later ones (its first
eager prompt steps), as a server's one burst is: compare first runs with first runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.throughput import random_prompts, _vocab_size  # noqa: E402


def engine_args_as_served(args):
    from aserve.config import EngineArgs
    from aserve.server.cli import placed_engine_args

    engine_args = EngineArgs(model=args.model, load_format=args.load_format, usage_context="api_server")
    return placed_engine_args(engine_args, not args.in_process)


async def read_stream(stream, submitted: float) -> tuple[int, float, int]:
    """(tokens, seconds to the first, prompt tokens the prefix cache served) of one request's
    DELTA outputs."""
    tokens, first, cached = 0, None, 0
    async for output in stream:
        new = len(output.outputs[0].token_ids)
        if new and first is None:
            first = time.perf_counter() - submitted
        tokens += new
        cached = max(cached, output.num_cached_tokens or 0)
    return tokens, first if first is not None else float("nan"), cached


async def one_burst(engine, prompts: list, params, spread_s: float, tag: str) -> dict:
    loop = asyncio.get_running_loop()
    readers = []
    steps_before = engine.num_steps
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        due = start + spread_s * i / len(prompts)
        if due > time.perf_counter():
            await asyncio.sleep(due - time.perf_counter())
        submitted = time.perf_counter()
        stream, accepted = engine.submit(f"{tag}-{i}", prompt, params)
        readers.append(loop.create_task(_accepted_then_read(engine, stream, accepted, submitted)))
    results = await asyncio.gather(*readers)
    elapsed = time.perf_counter() - start
    out_tokens = sum(tokens for tokens, _, _ in results)
    ttfts = [ttft * 1e3 for _, ttft, _ in results]
    return {"spread_ms": round(spread_s * 1e3), "requests": len(prompts), "elapsed_s": round(elapsed, 3),
            "output_tokens": out_tokens, "output_tokens_per_s": round(out_tokens / elapsed, 1),
            "ttft_mean_ms": round(statistics.fmean(ttfts), 1), "ttft_p50_ms": round(statistics.median(ttfts), 1),
            "steps": engine.num_steps - steps_before,
            "cached_prompt_tokens": sum(cached for _, _, cached in results)}


async def _accepted_then_read(engine, stream, accepted, submitted: float):
    return await read_stream(await engine.once_accepted(stream, accepted), submitted)


async def main_async(args) -> None:
    from aserve.engine.async_engine import AsyncEngine
    from aserve.engine.gc_policy import serve_with_fewer_collections
    from aserve.engine.process_async_engine import ProcessAsyncEngine
    from aserve.sampling_params import RequestOutputKind, SamplingParams

    engine_args = engine_args_as_served(args)
    engine_class = AsyncEngine if args.in_process else ProcessAsyncEngine
    engine = await asyncio.get_running_loop().run_in_executor(None, engine_class.from_engine_args, engine_args)
    engine.start()
    serve_with_fewer_collections()   # as the server's process once its engine is up (app.py)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    vocab = _vocab_size(args.model)
    try:
        await one_burst(engine, random_prompts(4, args.input_len, vocab, seed=0), params, 0.0, "warm-up")
        for run, spread_ms in enumerate(args.spread_ms):
            # Prompts of its own: the prefix cache is on, as in the server, and would serve a
            # run's prompts again to the next (the runs of a0f5858's first version did so).
            prompts = random_prompts(args.num_prompts, args.input_len, vocab, seed=1 + run)
            figures = await one_burst(engine, prompts, params, spread_ms / 1e3, f"run{run}")
            figures["engine"] = "in-process" if args.in_process else "engine process"
            print(json.dumps(figures), flush=True)
    finally:
        await engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--in-process", action="store_true", help="the engine thread in this process")
    parser.add_argument("--spread-ms", default="0", help="comma-separated: one run each")
    parser.add_argument("--timers", action="store_true",
                        help="bench/engine_thread_timing.py's timers in the engine process (its table at the end)")
    parser.add_argument("--stand-in-model", action="store_true",
                        help="with --timers: no model work (engine_thread_timing.py), the host's part alone")
    args = parser.parse_args()
    if args.timers and args.in_process:
        parser.error("--timers times an engine process: bench/engine_thread_timing.py times one process's engine")
    if args.stand_in_model and not args.timers:
        parser.error("--stand-in-model comes with --timers")
    if args.timers:
        from bench import engine_thread_timing

        # Its engine process hook takes its flags from sys.argv, as its own server mode does.
        sys.argv = ["engine_thread_timing.py", "server"] + (["--stand-in-model"] if args.stand_in_model else [])
        engine_thread_timing._time_engine_process(sys.argv)
    args.spread_ms = [float(v) for v in args.spread_ms.split(",")]
    from aserve.server.cli import _run

    _run(main_async(args))   # on uvloop, as the server


if __name__ == "__main__":
    main()
