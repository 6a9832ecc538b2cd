"""Shared-prefix traffic with the prefix cache on and off: throughput, TTFT and hit rate.

    python bench/prefix.py [--models A,B] [--num-prompts 1000] [--system-len 1024]
                           [--unique-len 128] [--output-len 128] [--conversations 200]
                           [--turns 4] [--turn-len 64] [--tiny]

Two scenarios, each offline with every request of a round added at once (TTFT = first token
time - arrival, as the engine records it):
  shared  N requests: one system prompt of --system-len tokens, then --unique-len tokens of
          their own; --output-len tokens out each.
  chat    --conversations conversations of --turns turns: turn k sends the whole history
          (every earlier user message and answer) plus --turn-len new tokens, and gets
          --turn-len tokens back; the turns of all conversations run as one round each.
Models as bench/workloads.py (A: OPT-125m shape, float16; B: Llama-3.1-8B shape, bfloat16;
random weights, no tokenizer), or `builtin`, aserve's built-in tiny model (the CPU run:
--models builtin --tiny); --tiny also shrinks the traffic (100 prompts, a 256-token system
prompt, 20 conversations) and the shapes of A and B to 2 layers. Each (model, cache on/off) runs in its own child process, so engines never share the
card. Prints one JSON line per run and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from workloads import MODEL_DTYPES, hf_config  # noqa: E402

MODELS = {"A": "opt", "B": "llama", "builtin": None}   # builtin: aserve's default model (CPU)


def _tokens(rng: np.random.RandomState, n: int, vocab: int) -> list[int]:
    return rng.randint(min(100, vocab // 2), min(30000, vocab), size=n).tolist()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _round(llm, prompts: list[list[int]], output_len: int):
    from aserve import SamplingParams

    stats = llm.engine.get_stats()
    queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    stats = llm.engine.get_stats()
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs]
    queried = stats.prefix_cache_queries - queries
    return outputs, elapsed, ttft, (stats.prefix_cache_hits - hits) / queried if queried else 0.0


def run_child(args) -> None:
    from aserve import OfflineLLM, SamplingParams

    model = MODELS[args.child_model]
    caching = args.child_caching == "on"
    with tempfile.TemporaryDirectory() as folder:
        if model is None:
            llm = OfflineLLM(skip_tokenizer_init=True, seed=0, enable_prefix_caching=caching)
        else:
            hf_config(model, args.tiny).save_pretrained(folder)
            llm = OfflineLLM(model=folder, load_format="dummy", skip_tokenizer_init=True,
                             dtype=args.dtype or ("float32" if args.tiny else MODEL_DTYPES[model]),
                             max_model_len=2048 if model == "opt" else 8192, seed=0,
                             enable_prefix_caching=caching)
        vocab = llm.engine.model_config.vocab_size
        rng = np.random.RandomState(1)
        llm.generate([_tokens(rng, 64, vocab) for _ in range(16)],   # warm-up, nothing shared
                     SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        llm.reset_prefix_cache()
        rng = np.random.RandomState(0)
        system = _tokens(rng, args.system_len, vocab)
        prompts = [system + _tokens(rng, args.unique_len, vocab) for _ in range(args.num_prompts)]
        _, elapsed, ttft, hit_rate = _round(llm, prompts, args.output_len)
        _report(args, "shared", caching, len(prompts) * args.output_len, elapsed, ttft, hit_rate)

        histories = [_tokens(rng, args.turn_len, vocab) for _ in range(args.conversations)]
        total_out, total_time, all_ttft, hit_tokens, query_tokens = 0, 0.0, [], 0.0, 0
        for turn in range(args.turns):
            outputs, elapsed, ttft, hit_rate = _round(llm, histories, args.turn_len)
            total_out += len(histories) * args.turn_len
            total_time += elapsed
            all_ttft += ttft
            queried = sum(len(h) for h in histories)
            hit_tokens += hit_rate * queried
            query_tokens += queried
            histories = [h + o.outputs[0].token_ids + _tokens(rng, args.turn_len, vocab)
                         for h, o in zip(histories, outputs)]
        _report(args, "chat", caching, total_out, total_time, all_ttft, hit_tokens / query_tokens)
        llm.shutdown()


def _report(args, scenario: str, caching: bool, out_tokens: int, elapsed: float, ttft, hit_rate) -> None:
    print(json.dumps({"scenario": scenario, "model": args.child_model, "prefix_caching": caching,
                      "output_tokens_per_s": round(out_tokens / elapsed, 1), "elapsed_s": round(elapsed, 3),
                      "ttft_p50_ms": round(_percentile(ttft, 50) * 1e3, 1),
                      "ttft_p99_ms": round(_percentile(ttft, 99) * 1e3, 1),
                      "hit_rate": round(hit_rate, 4)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="A,B")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--system-len", type=int, default=1024)
    p.add_argument("--unique-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--conversations", type=int, default=200)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--turn-len", type=int, default=64)
    p.add_argument("--dtype", default=None)
    p.add_argument("--tiny", action="store_true", help="2-layer models and small sizes (CPU)")
    p.add_argument("--child-model", help=argparse.SUPPRESS)
    p.add_argument("--child-caching", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tiny and not args.child_model:
        args.num_prompts, args.system_len, args.conversations = 100, 256, 20
    if args.child_model:
        run_child(args)
        return
    import torch

    print(json.dumps({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      "torch": torch.__version__, "tiny": args.tiny}), flush=True)
    results = []
    settings = ["--num-prompts", args.num_prompts, "--system-len", args.system_len, "--unique-len",
                args.unique_len, "--output-len", args.output_len, "--conversations", args.conversations,
                "--turns", args.turns, "--turn-len", args.turn_len]
    settings += (["--tiny"] if args.tiny else []) + (["--dtype", args.dtype] if args.dtype else [])
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        for caching in ("off", "on"):
            cmd = [sys.executable, os.path.abspath(__file__), *map(str, settings), "--child-model", name,
                   "--child-caching", caching]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout.splitlines():
                print(line, flush=True)
                if line.startswith('{"scenario"'):
                    results.append(json.loads(line))
            if proc.returncode:
                print(json.dumps({"model": name, "prefix_caching": caching, "error": proc.returncode}))
    print("\n| model | scenario | cache | out tok/s | TTFT p50 | TTFT p99 | hit rate |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['scenario']} | {'on' if r['prefix_caching'] else 'off'} | "
              f"{r['output_tokens_per_s']:.0f} | {r['ttft_p50_ms']:.0f} ms | {r['ttft_p99_ms']:.0f} ms | "
              f"{100 * r['hit_rate']:.1f}% |")


if __name__ == "__main__":
    main()
