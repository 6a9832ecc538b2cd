"""The GEMV kernel (aserve/cuda/gemv.py) against torch.nn.functional.linear in float32 on fresh
random inputs (GPU only).

Error bounds: the reference multiplies the same (already rounded) inputs in float32, so what is
left is the kernel's float32 summation order (a relative error of ~1e-6 here) and the rounding
of its output to the dtype: at most half a unit in the last place of the largest output, 2^-9
of max|ref| for bfloat16 and 2^-12 for float16. The bounds leave 5-10x headroom over that, and
are still far below what a wrong element or a dropped K tail would cost (an error of order
max|ref| itself).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max |gemv - reference| over max |reference|, per output dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# (N, K): Llama-3.1-8B's o_proj, qkv and down projections, OPT-125m's hidden size, and odd
# sizes: K whose vectors do not fill an unrolled step (264: tail only; 4104: steps and a
# tail), N that does not fill a warp's rows or a CTA (1000, 257, 3).
SHAPES = [(4096, 4096), (6144, 4096), (4096, 14336), (768, 768), (1000, 264), (257, 4104), (3, 8)]
LM_HEAD = (128256, 4096)


@pytest.fixture(autouse=True)
def exact_float32_reference(monkeypatch):
    """The float32 reference must not run on TF32 tensor cores (10-bit mantissas)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _random(shape, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=gen, device="cuda").to(dtype)


def _max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def _reference(x, weight, bias=None):
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def _check(x, weight, bias=None):
    from aserve.cuda.gemv import gemv

    out = gemv(x, weight, bias)
    assert out.shape == (x.shape[0], weight.shape[0]) and out.dtype == x.dtype
    assert _max_error(out, _reference(x, weight, bias)) <= TOLERANCE[x.dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_gemv_matches_linear(dtype, rows, shape, with_bias):
    n, k = shape
    seed = 10007 * DTYPES.index(dtype) + 101 * n + 7 * k + 2 * rows + with_bias
    weight = _random((n, k), dtype, seed)
    x = _random((rows, k), dtype, seed + 1)
    bias = _random((n,), dtype, seed + 2) if with_bias else None
    _check(x, weight, bias)


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_gemv_matches_linear_on_lm_head(rows, with_bias):
    """Llama-3's 128256-row vocabulary projection: the largest grid (bf16 only, to stay quick)."""
    n, k = LM_HEAD
    weight = _random((n, k), torch.bfloat16, 11)
    x = _random((rows, k), torch.bfloat16, 12 + rows)
    bias = _random((n,), torch.bfloat16, 13) if with_bias else None
    _check(x, weight, bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4])
def test_gemv_writes_float32_logits_on_request(dtype, rows):
    """out_dtype=float32 skips the final rounding to the dtype: the error is the float32 sum's
    alone, much less than a rounded output would show."""
    from aserve.cuda.gemv import gemv

    weight = _random((50272, 768), dtype, 21)
    x = _random((rows, 768), dtype, 22)
    bias = _random((50272,), dtype, 23)
    out = gemv(x, weight, bias, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == (rows, 50272)
    assert _max_error(out, _reference(x, weight, bias)) <= 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [2, 4])
def test_gemv_reads_strided_rows_of_x(dtype, rows):
    """x as a column slice of a wider tensor (the model's fused activations): rows are
    further apart than K, and do not start at the tensor's first element."""
    n, k = 1000, 768
    wide = _random((rows, k + 136), dtype, 31)
    x = wide[:, 8:8 + k]
    assert not x.is_contiguous()
    weight = _random((n, k), dtype, 32)
    _check(x, weight)


def test_gemv_replays_in_a_cuda_graph_with_new_inputs():
    from aserve.cuda.gemv import gemv

    dtype, n, k = torch.bfloat16, 4096, 4096
    weight = _random((n, k), dtype, 41)
    bias = _random((n,), dtype, 42)
    x = _random((2, k), dtype, 43)
    gemv(x, weight, bias)  # compiles and loads outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv(x, weight, bias)
    for seed in (44, 45):
        x.copy_(_random((2, k), dtype, seed))
        graph.replay()
        assert _max_error(out, _reference(x, weight, bias)) <= TOLERANCE[dtype]


# ------------------------------------------------------------------ the SILU_MUL variant
# Merged gate/up matrices [2d, K]: Llama-3.1-8B's and OPT-sized ones, and d not filling a CTA.
SILU_SHAPES = [(2 * 14336, 4096), (2 * 3072, 768), (2 * 257, 264), (2 * 3, 8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SILU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_gemv_silu_mul_is_the_gemv_then_silu_and_mul_bit_for_bit(dtype, rows, shape, with_bias):
    from aserve.cuda import fused
    from aserve.cuda.gemv import gemv, gemv_silu_mul

    n, k = shape
    seed = 4001 * DTYPES.index(dtype) + 11 * n + 7 * k + rows + with_bias
    weight = _random((n, k), dtype, seed)
    x = _random((rows, k), dtype, seed + 1)
    bias = _random((n,), dtype, seed + 2) if with_bias else None
    out = gemv_silu_mul(x, weight, bias)
    assert out.shape == (rows, n // 2) and out.dtype == dtype
    # The unfused decode path, which the engine's greedy tests hold to transformers.
    assert torch.equal(out, fused.silu_and_mul(gemv(x, weight, bias)))
    # And the float32 reference, within the dtype's tolerance.
    gate, up = _reference(x, weight, bias).chunk(2, dim=1)
    reference = F.silu(gate) * up
    assert _max_error(out, reference) <= 2 * TOLERANCE[dtype]


# ------------------------------------------------------------------ the deep geometry
@pytest.mark.parametrize("deep", [(2, 8), (2, 6)], ids=["2x8", "2x6"])   # ASERVE_GEMV_DEEP=1, =2x6
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2])   # gemv.DEEP_ROWS
@pytest.mark.parametrize("variant, shape", [("plain", s) for s in SHAPES] + [("silu_mul", s) for s in SILU_SHAPES],
                         ids=lambda v: v if isinstance(v, str) else f"{v[0]}x{v[1]}")
def test_gemv_deep_geometry_is_the_default_bit_for_bit_where_it_fits(monkeypatch, deep, dtype, rows, variant,
                                                                      shape):
    """ASERVE_GEMV_DEEP's geometries: each lane still sums its vectors of a row in the same
    order (a step of 8 or 6 loads takes the next vectors in turn), so the outputs are the default
    build's, bit for bit; and one is taken exactly where the layer's grid at it fits one wave of
    resident CTAs."""
    from aserve.cuda import gemv as gemv_module
    from aserve.cuda.compiler import load_module, num_sms

    n, k = shape
    seed = 5003 * DTYPES.index(dtype) + 11 * n + 7 * k + rows
    weight = _random((n, k), dtype, seed)
    x = _random((rows, k), dtype, seed + 1)
    run = gemv_module.gemv if variant == "plain" else gemv_module.gemv_silu_mul
    default = run(x, weight)
    monkeypatch.setattr(gemv_module, "_deep", deep)
    monkeypatch.setattr(gemv_module, "_plans", {})
    assert torch.equal(run(x, weight), default)

    outputs = n if variant == "plain" else n // 2
    chosen = gemv_module._plans[(variant, dtype, rows, outputs, torch.cuda.current_device())][3]
    sms = num_sms(torch.cuda.current_device())
    ctas, warps_per_cta = gemv_module._grid(outputs, 1 if variant == "silu_mul" else deep[0], sms)
    kernel = load_module("gemv.cu", gemv_module.gemv_options(dtype, rows, variant, deep),
                         torch.cuda.current_device()).kernel("gemv")
    resident = kernel.max_active_ctas_per_sm(32 * warps_per_cta)
    assert resident >= 1
    assert (chosen == deep) == gemv_module.deep_fits_one_wave(ctas, resident, sms)
    if (variant, shape) == ("plain", (4096, 14336)) and sms >= 128 and dtype != torch.float32:
        assert chosen == deep   # Llama-8B's down projection on an H100 or H200: what it is for


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("shape", [(768, 768), (2304, 768), (3072, 768), (768, 3072), (100, 72)])
def test_gemv_epilogues_are_the_torch_ops_after_it_bit_for_bit(dtype, rows, shape):
    """OPT's decode ops folded into the GEMV (query scaling on the first outputs, ReLU, the
    residual add) give exactly what the GEMV followed by torch's own kernels gives."""
    from aserve.cuda.gemv import gemv, launch_gemv

    n, k = shape
    seed = 5003 * DTYPES.index(dtype) + 13 * n + 3 * k + rows
    weight = _random((n, k), dtype, seed)
    x = _random((rows, k), dtype, seed + 1)
    bias = _random((n,), dtype, seed + 2)
    residual = _random((rows, n), dtype, seed + 3)
    plain = gemv(x, weight, bias)
    scaled = n // 3
    expected = plain.clone()
    expected[:, :scaled] = plain[:, :scaled] * 0.125
    assert torch.equal(launch_gemv(x, weight, bias, scaled=scaled, scale=0.125), expected)
    assert torch.equal(launch_gemv(x, weight, bias, relu=True), torch.relu(plain))
    assert torch.equal(launch_gemv(x, weight, bias, residual=residual), residual + plain)
    wide = _random((rows, n + 8), dtype, seed + 4)[:, 8:]   # rows of a wider tensor
    assert torch.equal(launch_gemv(x, weight, None, residual=wide), wide + gemv(x, weight))
    with pytest.raises(ValueError, match="residual must be"):
        launch_gemv(x, weight, bias, residual=residual[:, :-1])
    if dtype != torch.float32:
        with pytest.raises(ValueError, match="out_dtype"):
            launch_gemv(x, weight, bias, torch.float32, relu=True)


def test_gemv_silu_mul_refuses_an_odd_merged_matrix():
    from aserve.cuda.gemv import gemv_silu_mul

    x, weight = _valid(n=63)
    with pytest.raises(ValueError, match="even number of rows"):
        gemv_silu_mul(x, weight)


# ------------------------------------------------------------------ inputs it must refuse
def _valid(dtype=torch.bfloat16, rows=2, n=64, k=256):
    return _random((rows, k), dtype, 51), _random((n, k), dtype, 52)


def test_gemv_rejects_mismatched_dtypes():
    from aserve.cuda.gemv import gemv, gemv_usable

    x, weight = _valid()
    with pytest.raises(ValueError, match="weight: dtype"):
        gemv(x.half(), weight)
    with pytest.raises(ValueError, match="x: dtype"):
        gemv(x.double(), weight.double())
    assert not gemv_usable(x.half(), weight)


def test_gemv_rejects_rows_that_are_not_a_multiple_of_16_bytes():
    from aserve.cuda.gemv import gemv, gemv_usable

    x, weight = _valid(k=12)        # 24 bytes of bf16
    with pytest.raises(ValueError, match="16 bytes"):
        gemv(x, weight)
    assert not gemv_usable(x, weight)


def test_gemv_rejects_x_not_on_a_16_byte_boundary():
    from aserve.cuda.gemv import gemv, gemv_usable

    _, weight = _valid()
    flat = _random((2 * 256 + 8,), torch.bfloat16, 53)
    shifted = flat[1:1 + 2 * 256].view(2, 256)      # starts 2 bytes into the buffer
    with pytest.raises(ValueError, match="x: rows"):
        gemv(shifted, weight)
    assert not gemv_usable(shifted, weight)
    odd_stride = flat[:2 * 260].view(2, 260)[:, :256]   # rows 520 bytes apart
    with pytest.raises(ValueError, match="x: rows"):
        gemv(odd_stride, weight)


@pytest.mark.parametrize("rows", [0, 5])
def test_gemv_rejects_rows_outside_1_to_4(rows):
    from aserve.cuda.gemv import gemv, gemv_usable

    x, weight = _valid(rows=rows)
    with pytest.raises(ValueError, match="rows"):
        gemv(x, weight)
    assert not gemv_usable(x, weight)


def test_gemv_rejects_a_bias_of_the_wrong_shape_or_dtype():
    from aserve.cuda.gemv import gemv

    x, weight = _valid()
    with pytest.raises(ValueError, match="bias"):
        gemv(x, weight, _random((63,), torch.bfloat16, 54))
    with pytest.raises(ValueError, match="bias"):
        gemv(x, weight, _random((64,), torch.float32, 54))


def test_gemv_rejects_other_output_dtypes():
    from aserve.cuda.gemv import gemv

    x, weight = _valid()
    with pytest.raises(ValueError, match="out_dtype"):
        gemv(x, weight, out_dtype=torch.float16)


def test_gemv_usable_takes_a_valid_decode_input():
    from aserve.cuda.gemv import gemv_usable

    x, weight = _valid()
    assert gemv_usable(x, weight)
    assert not gemv_usable(x, weight.t().contiguous().t())       # transposed layout
    assert not gemv_usable(x.cpu(), weight.cpu())
