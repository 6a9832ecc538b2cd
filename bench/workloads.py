"""The issue's benchmark workloads, against their goals, with transformers as the baseline.

    python bench/workloads.py [--workloads A,B,B1,A1] [--baseline hf] [--tiny]

  A   OPT-125m shape (OPTConfig() defaults), float16, 1000 requests x (128 prompt + 128 output)
      tokens, sampling (temperature 1, top_p 1, no top_k): output tokens/s.
  B   Llama-3.1-8B shape, bfloat16, 1000 requests x (512 prompt + 256 output), sampling: output tokens/s.
  B1  model B, one request, 128 prompt + 512 output tokens, greedy: ms per output token.
  A1  the same request on model A: ms per output token.
  M   Qwen3-30B-A3B shape (a mixture of 128 experts, 8 a token), bfloat16, B's requests: output tokens/s.
  M1  model M, B1's request: ms per output token.
  (M and M1 are not issue goals: their table rows compare with transformers only. The experts'
  path follows ASERVE_MOE_GROUPED_MM, aserve/models/layers/moe.py: run both to compare.)

Every model has random weights (load_format="dummy": only a config.json is written, to a temp
folder) and no tokenizer (skip_tokenizer_init); prompts are token ids from
numpy.random.RandomState(0).randint(100, 30000, size=(N, P)); every request makes exactly its
output tokens (ignore_eos). Each system is timed after a warm-up (A and B: 32 prompts of another
seed, none of them a timed one); aserve's A1 and B1 are the median of --latency-runs runs (all of
them listed in its JSON line), after a run of the same request.

--baseline hf runs transformers' generate() on the same workloads in the same process, before the
engine starts and freed before it does (the engine takes gpu_memory_utilization of the card):
static batches of --hf-batch-size prompts, and only the first --hf-num-prompts prompts (static
batching's throughput does not depend on how many batches run). Each model runs in its own child
process, so one model's engine never shares the card with the next one's.

Output: one JSON line per (workload, system), the engine start time per model, and at the end a
table against the goals. --tiny shrinks the models (2 layers, hidden 64) and the workloads for a
smoke test on the CPU (goals then do not apply).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


@dataclass(frozen=True)
class Workload:
    name: str
    model: str            # "opt" (model A) or "llama" (model B)
    num_prompts: int
    prompt_len: int
    output_len: int
    greedy: bool          # greedy single-request latency, else sampling throughput
    goal_value: Optional[float]  # tokens/s at least (throughput) or ms/token at most (latency); None: none
    goal_ratio: float = 0.0  # throughput: at least this many times HF's tokens/s

    @property
    def latency(self) -> bool:
        return self.greedy


WORKLOADS = {
    "A": Workload("A", "opt", 1000, 128, 128, False, 17372, 3.5),
    "B": Workload("B", "llama", 1000, 512, 256, False, 5437, 3.5),
    # B1 and A1: time of the whole request / 512, prefill included, as the vLLM anchor
    # measured it (not the inter-token latency of the decode alone).
    "B1": Workload("B1", "llama", 1, 128, 512, True, 7.0),
    "A1": Workload("A1", "opt", 1, 128, 512, True, 2.0),
    "M": Workload("M", "qwen3moe", 1000, 512, 256, False, None),
    "M1": Workload("M1", "qwen3moe", 1, 128, 512, True, None),
}
TINY = {"A": (16, 16, 16), "B": (16, 32, 16), "B1": (1, 16, 32), "A1": (1, 16, 32),
        "M": (16, 32, 16), "M1": (1, 16, 32)}  # N, P, out
MODEL_NAMES = {"opt": "opt-125m", "llama": "llama-3.1-8b", "qwen3moe": "qwen3-30b-a3b"}
MODEL_DTYPES = {"opt": "float16", "llama": "bfloat16", "qwen3moe": "bfloat16"}


def workload(name: str, tiny: bool, num_prompts) -> Workload:
    w = WORKLOADS[name]
    if tiny:
        n, p, o = TINY[name]
        w = Workload(w.name, w.model, n, p, o, w.greedy, w.goal_value, w.goal_ratio)
    if num_prompts and not w.latency:
        w = Workload(w.name, w.model, num_prompts, w.prompt_len, w.output_len, w.greedy,
                     w.goal_value, w.goal_ratio)
    return w


def hf_config(model: str, tiny: bool):
    from transformers import LlamaConfig, OPTConfig

    if model == "opt":
        config = OPTConfig(architectures=["OPTForCausalLM"])  # facebook/opt-125m's shape
        if tiny:
            config = OPTConfig(architectures=["OPTForCausalLM"], hidden_size=64, word_embed_proj_dim=64,
                               ffn_dim=128, num_hidden_layers=2, num_attention_heads=4)
        return config
    if model == "qwen3moe":   # Qwen/Qwen3-30B-A3B: every layer sparse, 128 experts, 8 a token
        from transformers import Qwen3MoeConfig

        size = dict(hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_experts=8) if tiny else dict(
            hidden_size=2048, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
            num_key_value_heads=4, head_dim=128, num_experts=128)
        return Qwen3MoeConfig(vocab_size=151936, intermediate_size=6144, num_experts_per_tok=8, norm_topk_prob=True,
                              decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960,
                              rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                              bos_token_id=151643, eos_token_id=151645, architectures=["Qwen3MoeForCausalLM"], **size)
    # Llama-3.1-8B (its llama3 rope scaling left out: it changes no cost).
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2) if tiny else dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8)
    return LlamaConfig(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
                       architectures=["LlamaForCausalLM"], **size)


def prompts_for(w: Workload, seed: int = 0) -> list[list[int]]:
    """The workload's prompts; another seed gives a throughput run's warm-up prompts, which
    share no prefix with the timed ones (timed prompts found in the prefix cache would skip
    most of their prefill, and take a path, prompts with cached context, that the timed run's
    first step then paid for loading: 70-85 ms of a ~1.2 s run of A on the H200)."""
    return np.random.RandomState(seed).randint(100, 30000, size=(w.num_prompts, w.prompt_len)).tolist()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _result(w: Workload, system: str, model: str, dtype: str, num_prompts: int, out_tokens: int,
            elapsed: float, **extra) -> dict:
    r = {"workload": w.name, "system": system, "model": model, "dtype": dtype,
         "num_prompts": num_prompts, "prompt_len": w.prompt_len, "output_len": w.output_len,
         "output_tokens": out_tokens, "elapsed_s": round(elapsed, 3)}
    if w.latency:  # whole request (prefill included) / output tokens, as the vLLM anchor
        r["ms_per_output_token"] = round(elapsed * 1e3 / out_tokens, 3)
    else:
        r["output_tokens_per_s"] = round(out_tokens / elapsed, 1)
    r.update(extra)
    print(json.dumps(r), flush=True)
    return r


# ---------------------------------------------------------------------------- transformers
@torch.inference_mode()
def run_hf(config, dtype: torch.dtype, workloads: list[Workload], args, name: str) -> None:
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # built on the card in its dtype, never first in float32 on the CPU
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    model.eval()
    pad = config.eos_token_id
    # torch's cuDNN attention (SDPA's first choice on Hopper) builds a graph per new sequence
    # length: on an H200 (torch 2.11) that made HF's first pass over each length ~8x slower.
    # The flash backend has no such cost and is as fast after it, so the baseline runs on it.
    cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)

    def generate(batch, new_tokens, greedy):
        ids = torch.tensor(batch, device=device)
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), min_new_tokens=new_tokens,
                             max_new_tokens=new_tokens, pad_token_id=pad, **sampling)
        return out.shape[0] * (out.shape[1] - ids.shape[1])

    try:
        for w in workloads:
            prompts = prompts_for(w)[: max(1, args.hf_num_prompts)]
            generate(prompts[: min(len(prompts), args.hf_batch_size)], 4, w.greedy)  # warm-up
            _sync()
            start = time.perf_counter()
            out_tokens = sum(generate(prompts[i:i + args.hf_batch_size], w.output_len, w.greedy)
                             for i in range(0, len(prompts), args.hf_batch_size))
            _sync()
            _result(w, "hf", name, str(dtype).removeprefix("torch."), len(prompts), out_tokens,
                    time.perf_counter() - start, batch_size=args.hf_batch_size)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
        model = None  # frees the weights (gc below) before the engine takes the card
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- aserve
def run_aserve(model_dir: str, dtype: str, max_model_len: int, workloads: list[Workload], args,
               name: str) -> None:
    from aserve import OfflineLLM, SamplingParams

    start = time.perf_counter()
    llm = OfflineLLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype=dtype,
                     max_model_len=max_model_len, gpu_memory_utilization=0.9, seed=0,
                     max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                     enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling,
                     tensor_parallel_size=args.tensor_parallel_size)
    _sync()
    print(json.dumps({"engine_start_s": round(time.perf_counter() - start, 2), "model": name,
                      "dtype": dtype, "max_model_len": max_model_len,
                      "tensor_parallel_size": args.tensor_parallel_size,
                      "num_kv_blocks": llm.engine.cache_config.num_blocks}), flush=True)
    for w in workloads:
        prompts = prompts_for(w)
        temperature = 0.0 if w.greedy else 1.0
        params = SamplingParams(temperature=temperature, top_p=1.0, top_k=-1, max_tokens=w.output_len,
                                ignore_eos=True)
        if w.latency:
            llm.generate(prompts, params, use_tqdm=False)  # warm-up: the whole request once
        else:
            llm.generate(prompts_for(w, seed=1)[:32],
                         SamplingParams(temperature=temperature, max_tokens=8, ignore_eos=True),
                         use_tqdm=False)  # warm-up, on prompts of its own
        # A latency workload is one short request (a fraction of a second), which the host's
        # moment moves by up to 1.7x: it runs --latency-runs times and reports the median, as
        # vLLM's latency benchmark runs iterations after warm-up ones.
        elapsed_runs = []
        for _ in range(args.latency_runs if w.latency else 1):
            _sync()
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            _sync()
            elapsed_runs.append(time.perf_counter() - start)
            counts = {len(o.outputs[0].token_ids) for o in outputs}
            assert counts == {w.output_len}, f"{w.name}: output lengths {counts}, expected {w.output_len}"
        extra = {}
        if w.latency:
            extra["runs_ms_per_output_token"] = [round(e * 1e3 / w.output_len, 3) for e in elapsed_runs]
        _result(w, "aserve", name, dtype, len(prompts), w.output_len * len(prompts),
                sorted(elapsed_runs)[len(elapsed_runs) // 2], **extra,
                max_num_seqs=llm.engine.scheduler_config.max_num_seqs,
                max_num_batched_tokens=llm.engine.scheduler_config.max_num_batched_tokens,
                tensor_parallel_size=args.tensor_parallel_size)
    llm.shutdown()


def run_model_group(model: str, names: list[str], args) -> None:
    """One model's workloads: transformers first (then freed), then the engine."""
    workloads = [workload(n, args.tiny, args.num_prompts) for n in names]
    name = MODEL_NAMES[model] + ("-tiny" if args.tiny else "")
    dtype = args.dtype or ("float32" if args.tiny and not torch.cuda.is_available() else MODEL_DTYPES[model])
    config = hf_config(model, args.tiny)
    # A: 2048 is OPT's whole context. B and M: 4096 unless --llama-max-model-len says otherwise
    # (0: the model's whole length); the vLLM anchor ran B with the model's default length.
    max_model_len = 2048 if model == "opt" else (args.llama_max_model_len or config.max_position_embeddings)
    if args.baseline == "hf":
        run_hf(config, getattr(torch, dtype), workloads, args, name)
    with tempfile.TemporaryDirectory(prefix=f"aserve-bench-{model}-") as folder:
        config.save_pretrained(folder)  # config.json only: the weights are dummy
        run_aserve(folder, dtype, max_model_len, workloads, args, name)


# ---------------------------------------------------------------------------- driver
def run_child(model: str, names: list[str], argv: list[str], timeout) -> list[dict]:
    """Run one model group in a child process; echo its output; return its result lines."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--model-group", model,
           "--workloads", ",".join(names)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    timer = threading.Timer(timeout, proc.kill) if timeout else None
    if timer:
        timer.start()
    results = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith("{"):
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if "workload" in item and "system" in item:
                results.append(item)
    rc = proc.wait()
    if timer:
        timer.cancel()
    if rc != 0:
        why = f"killed after {timeout:.0f} s (--time-limit)" if timeout and rc < 0 else f"exit status {rc}"
        print(json.dumps({"model_group": model, "error": why}), flush=True)
    return results


def _fmt(value, latency: bool) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} ms/tok" if latency else f"{value:.0f} tok/s"


def table(names: list[str], results: list[dict], tiny: bool) -> str:
    rows = ["| workload | aserve | HF | aserve/HF | goal | met? |", "|---|---|---|---|---|---|"]
    for name in names:
        w = WORKLOADS[name]
        key = "ms_per_output_token" if w.latency else "output_tokens_per_s"
        got = {r["system"]: r.get(key) for r in results if r["workload"] == name}
        ours, hf = got.get("aserve"), got.get("hf")
        # A speed ratio either way: > 1 means aserve is faster.
        ratio = None if not (ours and hf) else (hf / ours if w.latency else ours / hf)
        if w.goal_value is None:
            goal, met = "- (not an issue goal)", None
        elif w.latency:
            goal = f"<= {w.goal_value} ms/tok"
            met = None if ours is None else ours <= w.goal_value
        else:
            goal = f">= {w.goal_value:.0f} tok/s and >= {w.goal_ratio}x HF"
            met = None if ours is None else ours >= w.goal_value and (ratio is not None and ratio >= w.goal_ratio)
            if met is False and ours >= w.goal_value and ratio is None:
                met = None  # no baseline ran: the ratio half is unknown
        shown = "-" if w.goal_value is None else {None: "?", True: "yes", False: "no"}[met]
        rows.append(f"| {name} | {_fmt(ours, w.latency)} | {_fmt(hf, w.latency)} | "
                    f"{'-' if ratio is None else f'{ratio:.2f}x'} | {goal} | {shown} |")
    if tiny:
        rows.append("(--tiny smoke run: shrunken models and workloads, the goals do not apply)")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="A,B,B1,A1", help="comma-separated, of A, B, B1, A1")
    p.add_argument("--baseline", choices=["hf"], default=None, help="also run transformers' generate")
    p.add_argument("--tiny", action="store_true", help="2-layer, hidden-64 models and small workloads")
    p.add_argument("--dtype", default=None, help="override the models' dtypes (float16 A, bfloat16 B)")
    p.add_argument("--num-prompts", type=int, default=None, help="requests of A and B (default 1000)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's for the device")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the engine's for the device")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per model (workers)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="schedule step k+1 while step k runs on the GPU (engine/pipeline.py)")
    p.add_argument("--llama-max-model-len", type=int, default=4096,
                   help="model B's and M's max_model_len; 0: the model's whole length (B: 131072, the vLLM anchor's)")
    p.add_argument("--latency-runs", type=int, default=5,
                   help="timed runs of A1 and B1 after a warm-up run; the median is reported")
    p.add_argument("--hf-num-prompts", type=int, default=128)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for the whole run: each model's child process gets an equal share "
                        "of what is left and is killed past it, so the table is always printed")
    p.add_argument("--model-group", choices=sorted(MODEL_NAMES), help=argparse.SUPPRESS)
    args, argv = p.parse_args(), sys.argv[1:]
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        p.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")

    if args.model_group:  # a child: one model's workloads
        run_model_group(args.model_group, names, args)
        return
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
                      "transformers": transformers.__version__, "workloads": names,
                      "tiny": args.tiny}), flush=True)
    results = []
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    models = list(dict.fromkeys(WORKLOADS[n].model for n in names))  # in order of first mention
    for i, model in enumerate(models):
        group = [n for n in names if WORKLOADS[n].model == model]
        timeout = None if deadline is None else max(1.0, (deadline - time.monotonic()) / (len(models) - i))
        results += run_child(model, group, _without(argv, "--workloads"), timeout)
    print("\n" + table(names, results, args.tiny), flush=True)


def _without(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == flag:
            skip = True
        elif not item.startswith(flag + "="):
            out.append(item)
    return out


if __name__ == "__main__":
    main()
