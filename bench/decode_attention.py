"""Microbenchmarks of aserve's CUDA kernels against the card's measured copy bandwidth.

    python bench/decode_attention.py [--batch 64 --context 2048 --heads 32 --kv-heads 8 --head-dim 128]
                            [--shapes 1x128,1x640] [--max-seq-len 4096] [--sweep | --variants JSON]

Prints one JSON line per measurement: the device-to-device copy ceiling (bytes read + written),
then the paged decode kernel on random bf16 inputs, counting the K/V bytes it must read, with
its share of the ceiling (the issue's goal: at least 70% at batch 64, context 2048, 32/8
heads, head size 128). Also a batch-1, 8k-context case, where the context split must fill the
GPU, and batch-1 short contexts (the single-stream workload B1). Kernels are timed inside CUDA
graphs, as the engine runs them: a lone launch through cuda-python costs more host time than
a short kernel's whole run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from aserve.cuda import ops  # noqa: E402


def time_ms(fn, repeat: int = 50, warmup: int = 5) -> float:
    """Median of device-event timings of fn()."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_graph_ms(fn, launches: int = 20, repeat: int = 10) -> float:
    """Device time of one fn() call: `launches` calls captured in one CUDA graph, replayed,
    the median replay divided by launches. Unlike time_ms this leaves out the host's launch
    cost (tens of microseconds through cuda-python, more than a small kernel's whole run),
    as the engine's decode graphs do."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    return time_ms(graph.replay, repeat=repeat, warmup=2) / launches


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy."""
    src = torch.randn(1 << 29, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), repeat=20)
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def decode(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, block_size: int,
           dtype: torch.dtype, ceiling: float, max_seq_len: int = 0) -> dict:
    """max_seq_len: the longest context the launch allows (0: `context`). The engine's decode
    graphs are captured for the model's whole length, so their grids carry split CTAs that
    find no work at short contexts."""
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = batch * blocks_per_seq
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device="cuda").to(dtype)
    tables = torch.randperm(num_blocks, device="cuda").int().view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, heads, head_dim, device="cuda").to(dtype)
    out = torch.empty_like(query)

    def run():
        ops.paged_decode_attention(out, query, cache[0], cache[1], tables, seq_lens, head_dim ** -0.5,
                                   max(context, max_seq_len))

    ms = time_graph_ms(run)
    kv_bytes = 2 * batch * context * kv_heads * head_dim * cache.element_size()
    bandwidth = kv_bytes / (ms / 1e3)
    return dict(kernel="paged_decode", batch=batch, context=context, heads=heads, kv_heads=kv_heads,
                head_dim=head_dim, block_size=block_size, dtype=str(dtype).replace("torch.", ""),
                max_seq_len=max(context, max_seq_len), ms=round(ms, 4), kv_gbytes=round(kv_bytes / 1e9, 3),
                gbps=round(bandwidth / 1e9, 1), of_copy_ceiling=round(bandwidth / ceiling, 3))


LAUNCHER_KEYS = ("KERNEL", "CTAS_PER_SM", "MIN_PARTITION", "CLUSTER", "CLUSTER_MAX_PARTITION")


def compare_variants(args, shapes, ceiling: float) -> None:
    """Each build of args.variants on each shape, in args.rounds interleaved rounds (so a clock
    or thermal drift hits every build alike); prints every timing, then each build's median."""
    results: dict[tuple, list[float]] = {}
    defaults = ops._CTAS_PER_SM, ops._MMA_CTAS_PER_SM
    default_unit, default_cluster = ops.MIN_PARTITION, ops.DECODE_CLUSTER
    default_cluster_partition = ops.CLUSTER_MAX_PARTITION
    for _ in range(args.rounds):
        for variant in args.variants:
            # Launcher settings: "KERNEL" (ops.DECODE_KERNEL: simt, mma), "CTAS_PER_SM" (the
            # split depth of that kernel's launches), "MIN_PARTITION" (the split unit: a
            # lone sequence's split count), "CLUSTER" (ops.DECODE_CLUSTER: CTAs per thread
            # block cluster, 1 for none) and "CLUSTER_MAX_PARTITION" (how long partitions grow to
            # fit a context into one cluster); the rest are -D options of its source.
            ops.DECODE_KERNEL = variant.get("KERNEL", "auto")
            ops.DECODE_CLUSTER = str(variant.get("CLUSTER", default_cluster))
            ops.CLUSTER_MAX_PARTITION = variant.get("CLUSTER_MAX_PARTITION", default_cluster_partition)
            ops.MIN_PARTITION = variant.get("MIN_PARTITION", default_unit)
            ops._CTAS_PER_SM = ops._MMA_CTAS_PER_SM = variant.get("CTAS_PER_SM", defaults[0])
            if "CTAS_PER_SM" not in variant:
                ops._MMA_CTAS_PER_SM = defaults[1]
            ops.DECODE_TUNING.clear()
            ops.DECODE_TUNING.update({k: v for k, v in variant.items() if k not in LAUNCHER_KEYS})
            for batch, context, block_size in shapes:
                result = decode(batch, context, args.heads, args.kv_heads, args.head_dim, block_size,
                                torch.bfloat16, ceiling, args.max_seq_len)
                results.setdefault((json.dumps(variant), batch, context, block_size), []).append(result["ms"])
                print(json.dumps(dict(result, variant=variant)), flush=True)
    ops.DECODE_TUNING.clear()
    ops.DECODE_KERNEL = "auto"
    ops._CTAS_PER_SM, ops._MMA_CTAS_PER_SM = defaults
    ops.MIN_PARTITION, ops.DECODE_CLUSTER = default_unit, default_cluster
    ops.CLUSTER_MAX_PARTITION = default_cluster_partition
    for (variant, batch, context, block_size), times in results.items():
        ms = statistics.median(times)
        kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * 2
        print(json.dumps(dict(summary=True, variant=json.loads(variant), batch=batch, context=context,
                              block_size=block_size, median_ms=round(ms, 4), runs=times,
                              of_copy_ceiling=round(kv_bytes / (ms / 1e3) / ceiling, 3))), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--sweep", action="store_true", help="also try other split depths (CTAs per SM)")
    p.add_argument("--variants", type=json.loads, default=None,
                   help='JSON list of builds to compare, e.g. \'[{"KERNEL": "simt"}, {"KERNEL": "mma", "STAGES": 3}]\' '
                        '(KERNEL: simt or mma, ops.DECODE_KERNEL; CTAS_PER_SM and MIN_PARTITION: the launcher\'s '
                        'split depth and unit; CLUSTER and CLUSTER_MAX_PARTITION: thread block clusters; the rest: '
                        '-D options of its source; {} is the default build), '
                        'timed in interleaved rounds')
    p.add_argument("--rounds", type=int, default=3, help="rounds of --variants")
    p.add_argument("--max-seq-len", type=int, default=0,
                   help="the longest context each launch allows, as a decode graph's (the engine captures "
                        "them for the model's length, e.g. 4096 for model B); 0: each shape's own context")
    p.add_argument("--shapes", default=None,
                   help="BATCHxCONTEXT[xBLOCK],... instead of the default set, e.g. 256x640,1x512")
    args = p.parse_args()
    ceiling = copy_bandwidth()
    print(json.dumps(dict(kernel="d2d_copy", device=torch.cuda.get_device_name(), gbps=round(ceiling / 1e9, 1))))
    shapes = [(args.batch, args.context, args.block_size), (args.batch, args.context, 32),
              (1, 8192, args.block_size), (256, 640, args.block_size), (1, 512, args.block_size),
              (1, 128, args.block_size)]
    if args.shapes:
        shapes = [tuple(int(x) for x in (s.split("x") + [str(args.block_size)])[:3])
                  for s in args.shapes.split(",")]
    for batch, context, block_size in shapes:
        print(json.dumps(decode(batch, context, args.heads, args.kv_heads, args.head_dim, block_size,
                                torch.bfloat16, ceiling, args.max_seq_len)), flush=True)
    if args.variants is not None:
        compare_variants(args, shapes, ceiling)
        return
    if args.sweep:
        # How deep the launcher fills the GPU with context splits (ops._CTAS_PER_SM), and the
        # smallest partition (ops.MIN_PARTITION), which decides a lone sequence's split count.
        defaults = ops._CTAS_PER_SM, ops.MIN_PARTITION
        for ctas, min_partition in ((8, 32), (12, 32), (24, 32), (32, 32), (16, 64), (16, 128)):
            ops._CTAS_PER_SM, ops.MIN_PARTITION = ctas, min_partition
            for batch, context, block_size in shapes:
                result = decode(batch, context, args.heads, args.kv_heads, args.head_dim, block_size,
                                torch.bfloat16, ceiling, args.max_seq_len)
                print(json.dumps(dict(result, ctas_per_sm=ctas, min_partition=min_partition)), flush=True)
        ops._CTAS_PER_SM, ops.MIN_PARTITION = defaults


if __name__ == "__main__":
    main()
