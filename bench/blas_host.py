"""Host time of one cuBLAS call as the engine makes them, per BLAS backend (GPU only):
    python bench/blas_host.py

The H200 profile of model A (bench/RESULTS.md, eleventh session) put the LM head's matmul at
~0.1 ms of host time a step and a prompt step's linears at ~87 us a call, under the profiler.
This times them without it: the LM head at batch 256 (OPT-125m's 768 x 50,272, an mm), a
prompt step's fused QKV at 8,192 tokens with and without bias (addmm goes through cublasLt's
bias epilogue), and a trivial op for scale; "host" is the time a call takes to return, "with
the GPU" includes waiting for all of them to finish.
"""
import sys
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    sys.exit("bench/blas_host.py needs a GPU")
dev = torch.device("cuda")
x = torch.randn(256, 768, device=dev, dtype=torch.float16)
w = torch.randn(50272, 768, device=dev, dtype=torch.float16)
xp = torch.randn(8192, 768, device=dev, dtype=torch.float16)
wq = torch.randn(2304, 768, device=dev, dtype=torch.float16)
bq = torch.randn(2304, device=dev, dtype=torch.float16)


def host_us(fn, n=200):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    total = (time.perf_counter() - t) / n * 1e6
    return host, total


for lib in ("default", "cublas", "cublaslt"):
    if lib != "default":
        torch.backends.cuda.preferred_blas_library(lib)
    for name, fn in [("lm_head 256 (mm)", lambda: F.linear(x, w)),
                     ("qkv 8192 +bias (addmm)", lambda: F.linear(xp, wq, bq)),
                     ("qkv 8192 no bias (mm)", lambda: F.linear(xp, wq)),
                     ("tiny add", lambda: x.add(1))]:
        h, t = host_us(fn)
        print(f"{lib:9s} {name:26s} host {h:7.1f} us/call, with the GPU {t:7.1f} us/call")
