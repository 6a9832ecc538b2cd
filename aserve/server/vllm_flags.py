"""vLLM command-line flags that mean nothing to aserve: accepted, each with one warning.

A launch script written for `vllm serve` must not die on the first flag aserve has no use for
(argparse would refuse it as unknown). The list is explicit, not a catch-all: a mistyped flag
is still an error, and so is a vLLM flag whose meaning aserve cannot honour safely (--ssl-*:
serving plain HTTP where HTTPS was asked for would be worse than refusing to start;
--pipeline-parallel-size, --data-parallel-size above 1, --lora-modules, --quantization: the model
would not be the one asked for).

Each entry: flag -> (takes a value, why aserve ignores it). A boolean flag is accepted in its
--no- form too, as vLLM's BooleanOptionalAction flags are.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger("aserve.server")

IGNORED_VLLM_FLAGS: dict[str, tuple[bool, str]] = {
    # ---- scheduling and memory knobs of vLLM's own engine
    "--swap-space": (True, "aserve preempts by recompute; it never swaps KV blocks to CPU"),
    "--cpu-offload-gb": (True, "aserve does not offload weights to CPU"),
    "--kv-cache-dtype": (True, "the KV cache is kept in the model's dtype"),
    "--enable-chunked-prefill": (False, "chunked prefill is always on"),
    "--max-num-partial-prefills": (True, "chunked prefill has no per-step limit of partial prompts"),
    "--max-long-partial-prefills": (True, "chunked prefill has no per-step limit of partial prompts"),
    "--long-prefill-token-threshold": (True, "chunked prefill has no long-prompt threshold"),
    "--scheduling-policy": (True, "the scheduler is first come, first served"),
    "--preemption-mode": (True, "preemption is always by recompute"),
    "--num-scheduler-steps": (True, "one step is scheduled at a time (with --async-scheduling ahead)"),
    "--num-lookahead-slots": (True, "no speculative decoding"),
    "--scheduler-delay-factor": (True, "the scheduler never delays a step"),
    "--use-v2-block-manager": (False, "there is one block manager"),
    "--block-allocator": (True, "there is one block allocator"),
    "--prefix-caching-hash-algo": (True, "cached blocks are keyed by content, compared exactly"),
    "--disable-hybrid-kv-cache-manager": (False, "there is one KV cache manager"),
    "--calculate-kv-scales": (False, "the KV cache is not quantized"),
    "--enable-sleep-mode": (False, "no sleep mode"),
    "--cuda-graph-sizes": (True, "decode graphs are captured for 1, 2, 4, 8, ... up to --max-num-seqs"),
    "--compilation-config": (True, "no torch.compile; CUDA graphs follow --enforce-eager"),
    "-O": (True, "no torch.compile; CUDA graphs follow --enforce-eager"),
    "--disable-async-output-proc": (False, "output processing runs in the engine thread"),
    "--stream-interval": (True, "every step's tokens are streamed"),
    # ---- processes, devices, executors
    "--distributed-executor-backend": (True, "ranks are processes started with spawn"),
    "--worker-cls": (True, "aserve has its own worker"),
    "--worker-extension-cls": (True, "aserve has its own worker"),
    "--max-parallel-loading-workers": (True, "each rank loads its own shard"),
    "--ray-workers-use-nsight": (False, "no Ray"),
    "--disable-custom-all-reduce": (False, "all-reduces are NCCL's"),
    "--disable-frontend-multiprocessing": (False, "the server and the engine share one process"),
    "--model-impl": (True, "models are aserve's own implementations"),
    "--tokenizer-mode": (True, "the model's fast (Rust) tokenizer is used"),
    "--tokenizer-pool-size": (True, "tokenization runs in a thread pool of the server"),
    "--tokenizer-pool-type": (True, "tokenization runs in a thread pool of the server"),
    "--config-format": (True, "configs are read in Hugging Face's format"),
    "--hf-config-path": (True, "the config is read from the model's folder"),
    "--code-revision": (True, "no remote model code is run"),
    # ---- observability and the HTTP front end
    "--enable-log-requests": (False, "aserve logs one access line per request by default"),
    "--max-log-len": (True, "the access log never prints prompts"),
    "--enable-log-outputs": (False, "the access log never prints outputs"),
    "--uvicorn-log-level": (True, "aiohttp, not uvicorn, serves; see --log-level"),
    "--disable-fastapi-docs": (False, "there are no FastAPI docs pages"),
    "--middleware": (True, "no ASGI middleware"),
    "--otlp-traces-endpoint": (True, "no OpenTelemetry tracing"),
    "--collect-detailed-traces": (True, "no OpenTelemetry tracing"),
    "--show-hidden-metrics-for-version": (True, "no hidden metrics"),
    "--guided-decoding-backend": (True, "structured outputs always use llguidance (same grammars)"),
    "--structured-outputs-config": (True, "structured outputs always use llguidance (same grammars)"),
    "--disable-mm-preprocessor-cache": (False, "no multi-modal models"),
    "--limit-mm-per-prompt": (True, "no multi-modal models"),
    "--mm-processor-kwargs": (True, "no multi-modal models"),
    "--enable-expert-parallel": (False, "experts are split over the tensor-parallel ranks by their "
                                        "intermediate size, each rank holding a slice of every expert"),
    "--speculative-config": (True, "no speculative decoding (outputs are the same, only slower)"),
}


class _IgnoredFlag(argparse.Action):
    """Records the flag for one warning after parsing (its value, if any, is dropped)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, "ignored_vllm_flags", None) or []
        if option_string not in seen:
            seen.append(option_string)
        namespace.ignored_vllm_flags = seen


def add_ignored_vllm_flags(parser: argparse.ArgumentParser) -> None:
    """Accept every flag of IGNORED_VLLM_FLAGS (hidden from --help; the README lists them)."""
    parser.set_defaults(ignored_vllm_flags=[])
    for flag, (takes_value, _) in IGNORED_VLLM_FLAGS.items():
        names = [flag]
        if not takes_value and flag.startswith("--"):
            names.append("--no-" + flag[2:])
        parser.add_argument(*names, dest="_ignored_" + flag.lstrip("-").replace("-", "_"),
                            action=_IgnoredFlag, nargs=None if takes_value else 0,
                            help=argparse.SUPPRESS)


def warn_ignored_vllm_flags(ns: argparse.Namespace) -> None:
    """One warning per ignored flag the command line held, saying why it has no effect."""
    for option in ns.ignored_vllm_flags:
        flag = option if option in IGNORED_VLLM_FLAGS else "--" + option.removeprefix("--no-")
        logger.warning("%s is a vLLM flag with no effect in aserve, ignored: %s.", option,
                       IGNORED_VLLM_FLAGS[flag][1])
