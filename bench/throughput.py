"""Offline throughput: N prompts of random token ids, fixed input/output lengths, ignore_eos.

    python bench/throughput.py --model PATH [--num-prompts 256 --input-len 128 --output-len 128]
                               [--baseline hf] [--dtype auto] [--engine-overhead]

Prints requests/s, output tokens/s and total tokens/s. --baseline hf runs transformers'
generate (static batches of --hf-batch-size, greedy, same lengths) on the same workload in the
same process and prints the ratio. --engine-overhead measures the engine's own per-step cost
(schedule + build inputs + process outputs, model excluded) at --num-prompts running requests,
phase by phase and, with async scheduling, as whole pipelined steps.
Runs unchanged on a GPU (device auto) or the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from aserve import OfflineLLM, SamplingParams  # noqa: E402


def random_prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # Ids from 10 upwards skip the special tokens most tokenizers put first.
    return torch.randint(10, vocab, (num, length), generator=gen).tolist()


def run_aserve(args, prompts) -> dict:
    llm = OfflineLLM(model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                     max_num_batched_tokens=args.max_num_batched_tokens,
                     kv_cache_memory_gb=args.kv_cache_memory_gb,
                     tensor_parallel_size=args.tensor_parallel_size,
                     enable_prefix_caching=args.enable_prefix_caching, load_format=args.load_format,
                     skip_tokenizer_init=args.skip_tokenizer_init)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[: min(4, len(prompts))], params, use_tqdm=False)   # warm-up
    _sync()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    _sync()
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return _figures("aserve", len(prompts), args.input_len * len(prompts), out_tokens, elapsed), llm


@torch.inference_mode()
def run_hf(args, prompts) -> dict:
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": torch.float16 if device == "cuda" else torch.float32, "float16": torch.float16,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(_model_path(args.model), dtype=dtype).to(device).eval()

    def generate(batch):
        ids = torch.tensor(batch, device=device)
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                              pad_token_id=0)

    generate(prompts[:1])   # warm-up
    _sync()
    start = time.perf_counter()
    out_tokens = 0
    for i in range(0, len(prompts), args.hf_batch_size):
        out = generate(prompts[i:i + args.hf_batch_size])
        out_tokens += out[:, args.input_len:].numel()
    _sync()
    elapsed = time.perf_counter() - start
    return _figures("hf", len(prompts), args.input_len * len(prompts), out_tokens, elapsed)


def engine_overhead(llm, args) -> dict:
    """Per-step engine cost with num_prompts running decodes, model forward excluded.

    The model's execute() is replaced by a stand-in that returns the same shapes of output
    (one token per sampled row), so schedule + prepare inputs + process outputs are timed.
    With tensor parallelism the stand-in also sends the step to the other ranks, as a real
    step does (as a dry run, which they receive, unpack and drop), and that send is timed too.
    """
    from aserve.worker.model_runner import ModelOutput
    from aserve.worker.step_arrays import STEP_DRY_RUN

    engine = llm.engine
    # --stream-outputs: every step reports every request, as the server's engine does.
    engine.stream_outputs = args.stream_outputs
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    max_len = engine.model_config.max_model_len
    params.max_tokens = max_len - args.input_len
    for i, prompt in enumerate(random_prompts(args.num_prompts, args.input_len, engine.model_config.vocab_size, 1)):
        engine.add_request(f"overhead-{i}", prompt, params)
    # Real steps until every request is decoding (prefills done).
    while engine.scheduler.waiting or any(r.seqs[0].num_output_tokens == 0 for r in engine.scheduler.running):
        engine.step()
    # The phases are timed one by one below: no step may stay in flight (async scheduling).
    pipeline, engine.pipeline = engine.pipeline, None
    if pipeline is not None:
        pipeline.drain()

    def fake_execute(plan):
        rows = plan.model_input.num_sample_rows
        return ModelOutput([11] * rows, None, [None] * rows, None, [])

    timings, sends, message_bytes = [], [], 0
    for _ in range(args.overhead_steps):
        t0 = time.perf_counter()
        plan = engine.schedule()
        t1 = time.perf_counter()
        if engine.workers is not None:
            engine.workers.send_step(STEP_DRY_RUN, plan.model_input.arrays)
            message_bytes = sum(p.nbytes for p in plan.model_input.arrays.pack(STEP_DRY_RUN))
        t2 = time.perf_counter()
        output = fake_execute(plan)
        t3 = time.perf_counter()
        engine.process(plan, output)
        t4 = time.perf_counter()
        timings.append((t1 - t0, t2 - t1, t4 - t3))
        sends.append(t2 - t1)
    engine.pipeline = pipeline
    pipelined = _pipelined_step_times(engine, args.overhead_steps) if pipeline is not None else None
    engine.abort_request([f"overhead-{i}" for i in range(args.num_prompts)])
    timings.sort(key=sum)
    med = timings[len(timings) // 2]
    result = {"running_requests": args.num_prompts, "tensor_parallel_size": args.tensor_parallel_size,
              "stream_outputs": args.stream_outputs,
              "prefix_caching": args.enable_prefix_caching,
              "median_step_ms": round(sum(med) * 1e3, 3),
              "schedule_and_prepare_ms": round(med[0] * 1e3, 3), "process_ms": round(med[2] * 1e3, 3)}
    if pipelined:
        # Async scheduling's whole host step (step k+1 scheduled and launched, step k's ids
        # taken and processed): the phases above plus the placeholders' bookkeeping.
        result["pipelined_step_ms"] = round(pipelined[len(pipelined) // 2] * 1e3, 3)
    if engine.workers is not None:
        sends.sort()
        result.update(send_step_p50_ms=round(sends[len(sends) // 2] * 1e3, 3),
                      send_step_p90_ms=round(sends[int(len(sends) * 0.9)] * 1e3, 3),
                      step_message_bytes=message_bytes)
    return result


def _pipelined_step_times(engine, steps: int) -> list[float]:
    """Sorted wall times of `steps` whole steps of async scheduling, each launch replaced by a
    stand-in whose ids (one per sampled row) are ready at once (single rank only)."""
    from aserve.worker.model_runner import ModelOutput

    class ReadyStep:
        def __init__(self, rows: int) -> None:
            self.rows = rows

        def result(self) -> ModelOutput:
            return ModelOutput([11] * self.rows, None, [None] * self.rows, None, [])

    runner = engine.runner
    runner.launch = lambda model_input, previous: ReadyStep(model_input.num_sample_rows)
    try:
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - started)
        engine.pipeline.drain()
    finally:
        del runner.launch   # the class's own method again
    return sorted(times)


def _figures(name, num_requests, in_tokens, out_tokens, elapsed) -> dict:
    return {"engine": name, "requests": num_requests, "elapsed_s": round(elapsed, 3),
            "requests_per_s": round(num_requests / elapsed, 3),
            "output_tokens_per_s": round(out_tokens / elapsed, 1),
            "total_tokens_per_s": round((in_tokens + out_tokens) / elapsed, 1)}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the built-in model)")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--kv-cache-memory-gb", type=float, default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--load-format", default="auto", help="dummy: random weights from a config alone")
    parser.add_argument("--skip-tokenizer-init", action="store_true",
                        help="no detokenization (bench/workloads.py's runs): the engine's cost without text")
    parser.add_argument("--baseline", choices=["hf"], default=None)
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--engine-overhead", action="store_true")
    parser.add_argument("--overhead-steps", type=int, default=50)
    parser.add_argument("--stream-outputs", action="store_true",
                        help="with --engine-overhead: an output per request per step, as the server")
    args = parser.parse_args()

    vocab = _vocab_size(args.model)
    prompts = random_prompts(args.num_prompts, args.input_len, vocab)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"device": device, "torch": torch.__version__, "model": args.model or "built-in",
                      "num_prompts": args.num_prompts, "input_len": args.input_len,
                      "output_len": args.output_len}))
    ours, llm = run_aserve(args, prompts)
    print(json.dumps(ours))
    if args.baseline == "hf":
        base = run_hf(args, prompts)
        print(json.dumps(base))
        print(json.dumps({"ratio_output_tokens_per_s": round(ours["output_tokens_per_s"] / base["output_tokens_per_s"], 2)}))
    if args.engine_overhead:
        print(json.dumps(engine_overhead(llm, args)))
    llm.shutdown()


def _model_path(model) -> str:
    from aserve.models.default_model import default_model_path
    from aserve.models.loader import resolve_model_path

    return resolve_model_path(model) if model else default_model_path()


def _vocab_size(model) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_model_path(model)).vocab_size


if __name__ == "__main__":
    main()
