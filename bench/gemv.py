"""The GEMV kernel (aserve/cuda/gemv.py) against torch's F.linear (cuBLAS) on decode-time shapes.

    python bench/gemv.py [--sweep]

Prints the device-to-device copy ceiling (bytes read + written per second, bench/decode_attention.py),
then one JSON line per (layer, rows of x): the milliseconds of F.linear and of gemv, the weight
bytes each streams per second, that as a share of the copy ceiling, gemv's speedup, and its
largest error against a float32 F.linear (relative to the largest output). Shapes: the linear
layers of Llama-3.1-8B in bfloat16 and of OPT-125m in float16 (with their biases), at 1, 2 and
4 rows.

Each time is the GPU time of one call inside a CUDA graph of many, as the engine's decode
steps run (a launch from Python costs more than most of these kernels). Consecutive calls read
different copies of the weight, together several times the L2 cache, so every call streams its
weight from HBM as it would in a model, where the other layers' weights pass through L2 in
between. --sweep also times the other (W rows per warp, unroll) geometries of the kernel.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from aserve.cuda import gemv as gemv_module  # noqa: E402
from aserve.cuda.compiler import nvrtc_version  # noqa: E402
from decode_attention import copy_bandwidth, time_ms  # noqa: E402

# (model, layer, N, K, dtype, bias)
SHAPES = [
    ("llama-3.1-8b", "qkv_proj", 6144, 4096, torch.bfloat16, False),
    ("llama-3.1-8b", "o_proj", 4096, 4096, torch.bfloat16, False),
    ("llama-3.1-8b", "gate_up_proj", 28672, 4096, torch.bfloat16, False),
    ("llama-3.1-8b", "down_proj", 4096, 14336, torch.bfloat16, False),
    ("llama-3.1-8b", "lm_head", 128256, 4096, torch.bfloat16, False),
    ("opt-125m", "qkv_proj", 2304, 768, torch.float16, True),
    ("opt-125m", "out_proj", 768, 768, torch.float16, True),
    ("opt-125m", "fc1", 3072, 768, torch.float16, True),
    ("opt-125m", "fc2", 768, 3072, torch.float16, True),
    ("opt-125m", "lm_head", 50272, 768, torch.float16, False),
]
ROWS = (1, 2, 4)
# Weight bytes cycled through per graph: 5x an H100's 50 MB L2, so no call finds its weight there.
COLD_BYTES = 256 << 20
# Calls per graph at least: the graph's launch and the first kernel's ramp-up are spread thin.
MIN_CALLS = 16
SWEEP_GEOMETRIES = [(1, 4), (1, 8), (2, 2), (2, 4), (4, 1), (4, 2)]


def graph_ms(calls) -> float:
    """Milliseconds per call of the calls, replayed back to back from one CUDA graph."""
    # Warm-up on a side stream, as torch.cuda.graph's docs ask: gemv compiles and loads its
    # kernel, cuBLAS sets up its handle and workspace, all outside the capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    ms = time_ms(graph.replay, repeat=10, warmup=2)
    del graph
    return ms / len(calls)


def measure(model, layer, n, k, dtype, with_bias, rows, ceiling, torch_ms=None) -> dict:
    weight_bytes = n * k * torch.finfo(dtype).bits // 8
    copies = max(1, math.ceil(COLD_BYTES / weight_bytes))
    weights = [torch.randn(n, k, device="cuda", dtype=dtype) for _ in range(copies)]
    bias = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    order = [weights[i % copies] for i in range(max(copies, MIN_CALLS))]
    if torch_ms is None:
        torch_ms = graph_ms([lambda w=w: F.linear(x, w, bias) for w in order])
    gemv_ms = graph_ms([lambda w=w: gemv_module.gemv(x, w, bias) for w in order])
    ref = F.linear(x.float(), weights[0].float(), None if bias is None else bias.float())
    err = (gemv_module.gemv(x, weights[0], bias).float() - ref).abs().max() / ref.abs().max()
    del weights
    torch_gbps, gemv_gbps = weight_bytes / torch_ms / 1e6, weight_bytes / gemv_ms / 1e6
    return dict(kernel="gemv", model=model, layer=layer, n=n, k=k, rows=rows,
                dtype=str(dtype).replace("torch.", ""), bias=with_bias,
                torch_ms=round(torch_ms, 4), gemv_ms=round(gemv_ms, 4),
                torch_gbps=round(torch_gbps, 1), gemv_gbps=round(gemv_gbps, 1),
                torch_of_copy_ceiling=round(torch_gbps * 1e9 / ceiling, 3),
                gemv_of_copy_ceiling=round(gemv_gbps * 1e9 / ceiling, 3),
                speedup=round(torch_ms / gemv_ms, 2), max_rel_err=float(f"{err.item():.2e}"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true",
                   help="also time every (W rows per warp, unroll) geometry in SWEEP_GEOMETRIES")
    args = p.parse_args()
    torch.manual_seed(0)
    # The float32 reference of max_rel_err must not run on TF32 tensor cores.
    torch.backends.cuda.matmul.allow_tf32 = False
    ceiling = copy_bandwidth()
    print(json.dumps(dict(kernel="d2d_copy", device=torch.cuda.get_device_name(), torch=torch.__version__,
                          cuda=torch.version.cuda, nvrtc=".".join(map(str, nvrtc_version())),
                          gbps=round(ceiling / 1e9, 1))), flush=True)
    for model, layer, n, k, dtype, with_bias in SHAPES:
        for rows in ROWS:
            result = measure(model, layer, n, k, dtype, with_bias, rows, ceiling)
            plan = gemv_module._plans.get((gemv_module.PLAIN, dtype, rows, n, torch.cuda.current_device()))
            print(json.dumps(dict(result, geometry=plan[3] if plan else gemv_module._GEOMETRY[rows])), flush=True)
            if args.sweep:
                default = gemv_module._GEOMETRY[rows]
                for geometry in SWEEP_GEOMETRIES:
                    if geometry == default:
                        continue
                    gemv_module._GEOMETRY[rows] = geometry
                    gemv_module._plans.clear()   # launches plan again, at the swept geometry
                    try:
                        swept = measure(model, layer, n, k, dtype, with_bias, rows, ceiling,
                                        torch_ms=result["torch_ms"])
                    finally:
                        gemv_module._GEOMETRY[rows] = default
                        gemv_module._plans.clear()
                    print(json.dumps(dict(swept, geometry=geometry)), flush=True)


if __name__ == "__main__":
    main()
