"""Where an engine's start goes (issue 11's goal: model B's engine ready in 5 s or less).

    python bench/profile_start.py [--model llama|opt] [--starts 2] [--top 30] [--tiny]

Starts the engine of model B (llama: the Llama-3.1-8B shape, bfloat16) or A (opt) on random
weights --starts times, one after the other in this process, as bench/workloads.py starts it.
The first start of a machine compiles the CUDA kernels into the disk cache; the starts after it
read them back, as a user's later starts do. For each start: its wall time and, where decode
graphs were captured, the capture's time, the part of it spent in eager warm-up runs and how
many there were. The last start runs under cProfile: aserve's own functions (and torch's graph
capture) by cumulative time, so that loading, the memory profile, the KV cache and the capture
come apart.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from aserve import OfflineLLM  # noqa: E402
from workloads import MODEL_DTYPES, hf_config  # noqa: E402


def start_engine(folder: str, dtype: str, max_model_len: int) -> tuple[OfflineLLM, float]:
    started = time.perf_counter()
    llm = OfflineLLM(model=folder, load_format="dummy", skip_tokenizer_init=True, dtype=dtype,
                     max_model_len=max_model_len, seed=0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return llm, time.perf_counter() - started


def describe(llm: OfflineLLM, seconds: float) -> str:
    graphs = llm.engine.runner.decode_graphs
    line = f"engine start {seconds:.2f} s"
    if graphs is not None:
        line += (f"; decode graphs: {len(graphs.sizes)} sizes in {graphs.capture_seconds:.2f} s, "
                 f"{graphs.num_warmups} eager warm-up runs taking {graphs.warmup_seconds:.2f} s")
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["llama", "opt"], default="llama")
    p.add_argument("--starts", type=int, default=2, help="engine starts; the last is profiled")
    p.add_argument("--top", type=int, default=30, help="functions listed")
    p.add_argument("--tiny", action="store_true", help="bench/workloads.py's tiny shapes (a CPU smoke run)")
    args = p.parse_args()
    dtype = "float32" if args.tiny and not torch.cuda.is_available() else MODEL_DTYPES[args.model]
    max_model_len = 2048 if args.model == "opt" else 4096
    with tempfile.TemporaryDirectory(prefix="aserve-start-") as folder:
        hf_config(args.model, args.tiny).save_pretrained(folder)   # config.json: the weights are dummy
        for start in range(1, args.starts + 1):
            profiler = cProfile.Profile() if start == args.starts else None
            if profiler:
                profiler.enable()
            llm, seconds = start_engine(folder, dtype, max_model_len)
            if profiler:
                profiler.disable()
            print(f"start {start}: {describe(llm, seconds)}", flush=True)
            llm.shutdown()
            del llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("cumulative").print_stats(r"aserve/|cuda/graphs\.py", args.top)
        print(f"the last start under cProfile, by cumulative time:\n{text.getvalue().strip()}")


if __name__ == "__main__":
    main()
