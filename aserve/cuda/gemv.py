"""A weight-streaming GEMV (gemv.cu) for decode-time linear layers: y = x @ W^T (+ bias) for
x of 1 to GEMV_MAX_ROWS rows, reading W once at close to the card's copy bandwidth.

A decode step at small batch is a chain of matrix-vector products, each bound by reading its
weight from HBM; the profile of a Llama-8B step at batch 1 on an H100 found cuBLAS streaming
o_proj's weight at about 1.6 TB/s against a ~2.95 TB/s copy ceiling (bench/gemv.py measures
both). Callers check `gemv_usable(x, weight)` and fall back to torch.nn.functional.linear,
the reference tests/test_cuda_gemv.py compares against.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from aserve.cuda.compiler import (FLOAT, INT, INT64, KERNEL_DTYPES, POINTER, current_stream,
                                  device_index, load_module, num_sms)
from aserve.cuda.fused import kernels_enabled

GEMV_MAX_ROWS = 4

# (rows of W per warp, unrolled steps over K) by the rows of x: a lane has 8 16-byte W loads in
# flight per step (4 KB per warp), which ptxas keeps hoisted ahead of the FMAs within the
# kernel's 128-register budget, and two W rows per warp share each read of x. (2, 4) was the
# fastest or within noise of it at every row count on the OPT-125m shapes in one H100 sweep
# (bench/gemv.py --sweep; bench/RESULTS.md); (4, 2) at 4 rows lost up to 25% there.
_GEOMETRY = {1: (2, 4), 2: (2, 4), 3: (2, 4), 4: (2, 4)}
# ASERVE_GEMV_GEOMETRY overrides it for some row counts, to measure a geometry in the whole decode
# chain (e.g. "1=2x8,2=2x8": two W rows a warp, 8 loads a row a step, at 1 and 2 rows of x). The
# H100 sweep above ran while ptxas issued most of the first step's loads after the PDL wait
# (bench/RESULTS.md, eighteenth session), so it may no longer hold for B1's chain.
GEOMETRY_ENV = "ASERVE_GEMV_GEOMETRY"


def _parse_shape(shape: str, env: str, example: str) -> tuple[int, int]:
    """(W rows a warp, unrolled loads) from "WxU", ValueError naming `env` where it does not
    parse or fit the kernel (W 1, 2 or 4; U 1-16)."""
    try:
        weight_rows, unroll = (int(value) for value in shape.strip().lower().split("x"))
    except ValueError:
        raise ValueError(f"{env}: {shape!r} is not WxU (e.g. {example})") from None
    if weight_rows not in (1, 2, 4) or not 1 <= unroll <= 16:
        raise ValueError(f"{env}: {shape!r} needs W 1, 2 or 4 and U 1-16")
    return weight_rows, unroll


def parse_geometry(text: str) -> dict[int, tuple[int, int]]:
    """{rows of x: (W rows a warp, unrolled loads)} from "ROWS=WxU,..." (ValueError naming it)."""
    geometry = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            rows, shape = part.split("=")
            rows = int(rows)
        except ValueError:
            raise ValueError(f"{GEOMETRY_ENV}: {part!r} is not ROWS=WxU (e.g. 1=2x8)") from None
        if not 1 <= rows <= GEMV_MAX_ROWS:
            raise ValueError(f"{GEOMETRY_ENV}: {part!r} needs ROWS 1-{GEMV_MAX_ROWS}")
        geometry[rows] = _parse_shape(shape, GEOMETRY_ENV, "1=2x8")
    return geometry


_GEOMETRY.update(parse_geometry(os.environ.get(GEOMETRY_ENV, "")))

# A deeper geometry, for a layer whose grid leaves warp slots empty: 8 loads a W row a step, so
# 8 KB a warp in flight instead of 4, at 126 registers (4 CTAs of 128 threads an SM on an H200,
# against 6; at 3 and 4 rows of x it would spill). Llama-8B's o_proj and down (4,096 outputs:
# 512 CTAs) fill two thirds of a wave at (2, 4) and stream below the bigger GEMVs' rate; at
# (2, 8) they took 6.95 and 25.36 us a call against 8.33 and 27.61, while QKV (768 CTAs, more
# than a wave at 4 an SM) lost, and the norms after o_proj and down ended 1.1 us later (likely:
# a full register file keeps the norm's CTA from moving in early; bench/RESULTS.md, nineteenth
# session). ASERVE_GEMV_DEEP=1 takes it for each layer whose grid at it fits one wave of
# resident CTAs (deep_fits_one_wave), the default since the twenty-first session measured it
# on an H200 (B1 3.92 / 3.93 ms a token against 3.98 / 3.99 at 0, taking turns in one lease;
# the chain 3.917 against 4.068 ms a step: bench/RESULTS.md); =WxU takes that geometry instead
# (2x6: ~108 registers, also 4 CTAs an SM, with room beside them: 3.97 / 3.94); 0 never.
DEEP_GEOMETRY = (2, 8)
DEEP_ROWS = (1, 2)
DEEP_ENV = "ASERVE_GEMV_DEEP"


def parse_deep(text: str) -> Optional[tuple[int, int]]:
    """ASERVE_GEMV_DEEP's geometry: None for "0" or "", DEEP_GEOMETRY for "1", (W, U) for "WxU"
    (ValueError naming the variable)."""
    text = text.strip().lower()
    if text in ("", "0"):
        return None
    return DEEP_GEOMETRY if text == "1" else _parse_shape(text, DEEP_ENV, "2x6")


_deep = parse_deep(os.environ.get(DEEP_ENV, "1"))
# A layer shape's launch, made once: (kernel, CTAs, warps a CTA, geometry) by (variant, dtype,
# rows, n, device), so a decode step's launches skip the options, the module lookup and the
# grid arithmetic.
_plans: dict[tuple, tuple] = {}
# Warps per CTA at most (gemv.cu's MAX_THREADS / 32). Few rows of W per CTA keep the grid fine
# grained, so the last wave of a layer that does not divide evenly across SMs is short.
_MAX_WARPS_PER_CTA = 4


# The variants of gemv.cu: a plain GEMV, and one that applies a gated MLP's SiLU-and-mul to
# its merged gate/up outputs (one kernel fewer a layer in a decode step).
PLAIN, SILU_MUL = "plain", "silu_mul"
VARIANTS = (PLAIN, SILU_MUL)


def gemv_options(dtype: torch.dtype, rows: int, variant: str = PLAIN,
                 geometry: Optional[tuple[int, int]] = None) -> list[str]:
    """The -D options of the gemv.cu build for x of `rows` rows in `dtype`, at `geometry` (W rows
    a warp, unrolled loads; default: the row count's)."""
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"dtype must be one of {list(KERNEL_DTYPES)}, got {dtype}")
    if not 1 <= rows <= GEMV_MAX_ROWS:
        raise ValueError(f"rows must be 1 to {GEMV_MAX_ROWS}, got {rows}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    # SILU_MUL pairs a gate row with an up row in each warp: two weight rows, whatever the geometry.
    weight_rows, unroll = geometry or _GEOMETRY[rows]
    if variant == SILU_MUL:
        weight_rows = 2
    return [f"-DDTYPE={KERNEL_DTYPES[dtype]}", f"-DROWS={rows}", f"-DWEIGHT_ROWS={weight_rows}",
            f"-DUNROLL={unroll}", f"-DSILU_MUL={int(variant == SILU_MUL)}"]


def gemv_builds(dtype: torch.dtype) -> list[tuple[str, list[str]]]:
    """Every gemv.cu build a decode step in `dtype` may load (_plan): each row count and variant
    at its geometry, and at the deep one where a layer may take it. For compile_ahead."""
    builds = []
    for rows in range(1, GEMV_MAX_ROWS + 1):
        geometries = [_GEOMETRY[rows], *([_deep] if rows in DEEP_ROWS and _deep is not None else [])]
        for variant in VARIANTS:
            for geometry in geometries:
                build = ("gemv.cu", gemv_options(dtype, rows, variant, geometry))
                if build not in builds:
                    builds.append(build)
    return builds


def _unsupported(x: torch.Tensor, weight: torch.Tensor) -> Optional[str]:
    """Why the kernel cannot take x [M, K] and weight [N, K], or None when it can."""
    if x.dim() != 2:
        return f"x must be 2-D [M, K], got shape {tuple(x.shape)}"
    if weight.dim() != 2:
        return f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}"
    if not x.is_cuda:
        return f"x must be on a CUDA device, got {x.device}"
    if weight.device != x.device:
        return f"weight must be on x's device {x.device}, got {weight.device}"
    if x.dtype not in KERNEL_DTYPES:
        return f"x: dtype must be one of {list(KERNEL_DTYPES)}, got {x.dtype}"
    if weight.dtype != x.dtype:
        return f"weight: dtype {weight.dtype} must equal x's {x.dtype}"
    rows, k = x.shape
    if not 1 <= rows <= GEMV_MAX_ROWS:
        return f"x must have 1 to {GEMV_MAX_ROWS} rows, got {rows}"
    if weight.shape[1] != k:
        return f"weight has {weight.shape[1]} columns, x has {k}"
    if not weight.is_contiguous():
        return f"weight must be contiguous, got strides {tuple(weight.stride())}"
    element = x.element_size()
    # 16-byte vector loads: every row of x and W must start on a 16-byte boundary.
    if (k * element) % 16:
        return f"weight/x: a row of K={k} elements ({k * element} bytes) must be a multiple of 16 bytes"
    if x.stride(1) != 1:
        return f"x: each row must be contiguous, got strides {tuple(x.stride())}"
    if x.data_ptr() % 16 or (rows > 1 and (x.stride(0) * element) % 16):
        return "x: rows must start on 16-byte boundaries"
    if weight.data_ptr() % 16:
        return "weight must start on a 16-byte boundary"
    return None


def gemv_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether gemv can take x [M, K] @ weight[N, K]^T: on a GPU, 1 to GEMV_MAX_ROWS rows, a
    kernel dtype shared by both, weight contiguous, rows 16-byte aligned, kernels enabled."""
    return _unsupported(x, weight) is None and kernels_enabled()


def _warps_per_cta(num_warps: int, num_sms: int) -> int:
    """Fewer warps per CTA while the grid would leave SMs idle: a small layer (OPT-125m's 768
    outputs are 384 warps) then spreads over every SM's load units instead of a third of them."""
    warps = _MAX_WARPS_PER_CTA
    while warps > 1 and -(-num_warps // warps) < num_sms:
        warps //= 2
    return warps


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
         out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias [N]) as a new [M, N] tensor, M = 1..GEMV_MAX_ROWS,
    accumulated in float32 and rounded once to out_dtype (x's dtype, or float32 for logits).

    x's rows may be strided (a row slice of a wider tensor) but each must be dense; weight is
    contiguous (torch.nn.Linear's layout); both share a dtype of KERNEL_DTYPES. Rows must be
    16-byte aligned. Launches on torch's current stream and allocates only the output, so CUDA
    graphs capture it. Raises ValueError naming the argument that does not fit.
    """
    problem = _unsupported(x, weight)
    if problem is not None:
        raise ValueError(problem)
    rows, k = x.shape
    n = weight.shape[0]
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias must be {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}")
        if bias.stride(0) != 1:
            raise ValueError(f"bias must be contiguous, got stride {bias.stride(0)}")
    if out_dtype is None:
        out_dtype = x.dtype
    if out_dtype not in (x.dtype, torch.float32):
        raise ValueError(f"out_dtype must be x's dtype {x.dtype} or torch.float32, got {out_dtype}")
    return launch_gemv(x, weight, bias, out_dtype)


def launch_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                out_dtype: Optional[torch.dtype] = None, *, residual: Optional[torch.Tensor] = None,
                relu: bool = False, scaled: int = 0, scale: float = 1.0) -> torch.Tensor:
    """gemv without its argument checks, for a caller that has checked gemv_usable(x, weight)
    and passes a bias (if any) of x's dtype and device, [N] and contiguous: the model's linear
    layers, which would otherwise check every input twice per decode step.

    In x's dtype, the ops a decode step applies next may follow in the same kernel, each rounded
    as torch rounds it: the first `scaled` outputs times `scale`, then ReLU, then + residual
    ([M, N] of x's dtype and device, dense rows)."""
    out_dtype = out_dtype or x.dtype
    if (residual is not None or relu or scaled) and out_dtype != x.dtype:
        raise ValueError("residual, relu and scaled need out_dtype equal to x's dtype")
    if residual is not None and (residual.shape != (x.shape[0], weight.shape[0]) or residual.stride(1) != 1
                                 or residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(f"residual must be a {x.dtype} tensor of shape ({x.shape[0]}, {weight.shape[0]}) on "
                         f"{x.device} with dense rows, got {residual.dtype} {tuple(residual.shape)} "
                         f"with strides {tuple(residual.stride())}")
    out = torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype, device=x.device)
    _launch(PLAIN, out, x, weight, bias, residual, relu, scaled, scale)
    return out


def gemv_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(g) * u for [g, u] = x @ weight^T (+ bias), weight the merged [gate; up] matrix
    [2d, K]: a gated MLP's gate/up projection and its activation in one kernel, rounded as
    fused.silu_and_mul(gemv(x, weight, bias)) is. The caller has checked gemv_usable(x, weight)
    and passes a bias (if any) of x's dtype and device, [2d] and contiguous."""
    if weight.shape[0] % 2:
        raise ValueError(f"weight: a merged gate/up matrix has an even number of rows, got {weight.shape[0]}")
    out = torch.empty(x.shape[0], weight.shape[0] // 2, dtype=x.dtype, device=x.device)
    _launch(SILU_MUL, out, x, weight, bias)
    return out


def deep_fits_one_wave(ctas: int, ctas_per_sm: int, sms: int) -> bool:
    """Whether a grid of `ctas` runs in one wave of the deep build's resident CTAs: then each
    warp's deeper steps put more bytes in flight at once. A grid past one wave waits for a
    second wave's CTAs to start (their loads begin only then), which costs more than the depth
    gains."""
    return 0 < ctas <= ctas_per_sm * sms


def _grid(n: int, outputs_per_warp: int, sms: int) -> tuple[int, int]:
    """(CTAs, warps a CTA) of a launch for n outputs."""
    num_warps = -(-n // outputs_per_warp)
    warps_per_cta = _warps_per_cta(num_warps, sms)
    return -(-num_warps // warps_per_cta), warps_per_cta


def _plan_at(variant: str, dtype: torch.dtype, rows: int, n: int, index: int, geometry: tuple[int, int]) -> tuple:
    """(kernel, CTAs, warps a CTA, geometry) of a launch for n outputs at `geometry`."""
    ctas, warps_per_cta = _grid(n, 1 if variant == SILU_MUL else geometry[0], num_sms(index))
    kernel = load_module("gemv.cu", gemv_options(dtype, rows, variant, geometry), index).kernel("gemv")
    return kernel, ctas, warps_per_cta, geometry


def _plan(variant: str, dtype: torch.dtype, rows: int, n: int, index: int) -> tuple:
    """The launch for n outputs: at the row count's geometry, or at the deep one where it is
    enabled and the layer's grid at it fits one wave (the driver asked once per layer shape)."""
    key = (variant, dtype, rows, n, index)
    plan = _plans.get(key)
    if plan is None:
        plan = _plan_at(variant, dtype, rows, n, index, _GEOMETRY[rows])
        if rows in DEEP_ROWS and _deep is not None and _deep != plan[3]:
            deep = _plan_at(variant, dtype, rows, n, index, _deep)
            kernel, ctas, warps_per_cta, _ = deep
            if deep_fits_one_wave(ctas, kernel.max_active_ctas_per_sm(32 * warps_per_cta), num_sms(index)):
                plan = deep
        _plans[key] = plan
    return plan


def _launch(variant: str, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
            bias: Optional[torch.Tensor], residual: Optional[torch.Tensor] = None, relu: bool = False,
            scaled: int = 0, scale: float = 1.0) -> None:
    """One launch of `variant` writing out [M, n]: n is out's width (under SILU_MUL, half of
    weight's rows), and each warp covers its share of those outputs."""
    rows, k = x.shape
    n = out.shape[1]
    if n == 0:
        return
    kernel, ctas, warps_per_cta, _ = _plan(variant, x.dtype, rows, n, device_index(x))
    kernel.launch(
        (ctas, 1, 1), (32 * warps_per_cta, 1, 1), 0,
        (out.data_ptr(), x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else 0,
         # float32 logits of a 16-bit x (a float32 model's output is its scalar_t).
         x.stride(0), n, k, int(out.dtype == torch.float32 and x.dtype != torch.float32),
         residual.data_ptr() if residual is not None else 0, residual.stride(0) if residual is not None else 0,
         int(relu), min(scaled, n), float(scale)),
        (POINTER, POINTER, POINTER, POINTER, INT64, INT, INT, INT, POINTER, INT64, INT, INT, FLOAT),
        current_stream(x), pdl=True)
