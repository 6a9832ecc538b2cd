"""Does a weight prefetched into L2 during an idle window make the GEMV after it faster?

    python bench/l2_prefetch.py [--window-us 12]

Models one stretch of a batch-1 Llama-8B layer in a CUDA graph, over 16 different copies of
each weight (far more than L2 holds): a GEMV streaming a [6144, 4096] weight (as qkv_proj,
so HBM is busy up to the window), then a window in which HBM idles (a spin kernel of
--window-us, as rotary and the decode attention are), then a GEMV of o_proj's shape
[4096, 4096]. With prefetch, aserve/cuda/l2_prefetch.py's kernel runs between the first GEMV
and the window, asking L2 for all (or --bytes-mb) of the second GEMV's weight.

Prints the microseconds per stretch with the prefetch off and on (taking turns), and the
difference: what the second GEMV saved, less what the prefetch kernel costs the chain.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from aserve.cuda import gemv as gemv_module  # noqa: E402
from aserve.cuda import l2_prefetch  # noqa: E402
from gemv import graph_ms  # noqa: E402

COPIES = 16


def spin_cycles(us: float) -> int:
    clock_khz = torch.cuda.get_device_properties(0).clock_rate  # kHz
    return int(us * clock_khz / 1000)


def stretch_us(prefetch: bool, window_us: float, max_bytes, first, second, x) -> float:
    cycles = spin_cycles(window_us)

    def one(i):
        def call():
            gemv_module.gemv(x, first[i])
            if prefetch:
                l2_prefetch.prefetch_to_l2(second[i], max_bytes)
            if cycles:
                torch.cuda._sleep(cycles)
            gemv_module.gemv(x, second[i])
        return call

    return graph_ms([one(i) for i in range(COPIES)]) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window-us", type=float, nargs="+", default=[0.0, 4.0, 12.0])
    p.add_argument("--bytes-mb", type=float, default=None, help="prefetch only this much of the second weight")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    os.environ[l2_prefetch.PREFETCH_ENV] = "1"
    dtype = torch.bfloat16
    first = [torch.randn(6144, 4096, device="cuda", dtype=dtype) for _ in range(COPIES)]
    second = [torch.randn(4096, 4096, device="cuda", dtype=dtype) for _ in range(COPIES)]
    x = torch.randn(1, 4096, device="cuda", dtype=dtype)
    max_bytes = None if args.bytes_mb is None else int(args.bytes_mb * (1 << 20))
    print(json.dumps({"device": torch.cuda.get_device_name(), "l2_mb": torch.cuda.get_device_properties(0).L2_cache_size >> 20}))
    for window in args.window_us:
        off, on = [], []
        for _ in range(args.rounds):
            off.append(stretch_us(False, window, max_bytes, first, second, x))
            on.append(stretch_us(True, window, max_bytes, first, second, x))
        print(json.dumps({"window_us": window, "bytes_mb": args.bytes_mb, "off_us": [round(v, 2) for v in off],
                          "on_us": [round(v, 2) for v in on], "saved_us": round(min(off) - min(on), 2)}))


if __name__ == "__main__":
    main()
