"""Every CUDA kernel compiles with NVRTC for sm_80 and sm_90 (no GPU needed), and the compiler's
cache and error reporting behave."""

from __future__ import annotations

import pytest
import torch

from aserve.cuda import compiler, ops
from aserve.cuda.gemv import GEMV_MAX_ROWS, VARIANTS, gemv_options


pytestmark = pytest.mark.skipif(not compiler.nvrtc_available(),
                                reason='NVRTC is not installed (pip install "cuda-python[all]")')


@pytest.fixture(autouse=True)
def fresh_cubin_cache(tmp_path, monkeypatch):
    """Compile for real, not from an earlier run's cache."""
    monkeypatch.setenv("ASERVE_CACHE_DIR", str(tmp_path))


def _decode_builds():
    """Every dtype and head size at the largest query-head group (most registers) and at 4 (the
    longest tiles, most shared memory), and the other block size and group shapes on one dtype."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for head_dim in ops.HEAD_SIZES:
            yield dtype, head_dim, 16, ops.MAX_GROUP
            yield dtype, head_dim, 16, 4
    for block_size, group in ((32, 1), (32, 4), (16, 7), (8, 2), (64, 4), (128, 8)):
        yield torch.bfloat16, 128, block_size, group


@pytest.mark.parametrize("arch", [80, 90])
def test_every_paged_attention_build_compiles(arch):
    for dtype, head_dim, block_size, group in _decode_builds():
        cubin = compiler.compile_cubin("paged_attention.cu",
                                       ops.paged_attention_options(dtype, head_dim, block_size, group), arch)
        assert cubin[:4] == b"\x7fELF", (dtype, head_dim, block_size, group)


def test_every_cluster_combining_decode_build_compiles():
    """The CUDA-core decode kernel with splits combined in thread block clusters (sm_90 and newer)."""
    for dtype, head_dim, block_size, group in _decode_builds():
        options = ops.paged_attention_options(dtype, head_dim, block_size, group, cluster_combine=True)
        assert compiler.compile_cubin("paged_attention.cu", options, 90)[:4] == b"\x7fELF", (dtype, head_dim, group)


def test_decode_cluster_size_and_grid(monkeypatch):
    """Clusters on sm_90 and newer for small launches with several splits and contexts that one
    cluster covers, at most DECODE_CLUSTER CTAs, grid.z rounded up to whole clusters; none
    before Hopper, for one split, for launches of more than CLUSTER_MAX_GROUPS sequence and
    head-group pairs or longer contexts, or when turned off."""
    monkeypatch.setattr(ops, "_capability", lambda index: (9, 0))
    longest = 16 * ops.CLUSTER_MAX_PARTITION
    assert ops.decode_cluster(8, 64, longest, 0) == (16, 64)
    assert ops.decode_cluster(8, 20, 640, 0) == (16, 32)
    assert ops.decode_cluster(12, 5, 160, 0) == (5, 5)
    assert ops.decode_cluster(8, 1, 16, 0) == (1, 1)
    assert ops.decode_cluster(ops.CLUSTER_MAX_GROUPS + 1, 64, 4096, 0) == (1, 64)
    assert ops.decode_cluster(8, 64, longest + 1, 0) == (1, 64)
    assert ops.decode_cluster(8, 20, 640, 0, limit=8) == (8, 24)   # a GPU that holds 8 of them
    assert ops.decode_cluster(8, 64, longest, 0, limit=8) == (1, 64)
    assert ops.decode_cluster(8, 64, 640, 0, limit=1) == (1, 64)
    monkeypatch.setattr(ops, "DECODE_CLUSTER", "8")
    assert ops.decode_cluster(8, 20, 640, 0) == (8, 24)
    assert ops.decode_cluster(8, 64, longest, 0) == (1, 64)       # 8 CTAs cover half as much
    for off in ("0", "1"):
        monkeypatch.setattr(ops, "DECODE_CLUSTER", off)
        assert ops.decode_cluster(8, 64, 640, 0) == (1, 64)
    monkeypatch.setattr(ops, "DECODE_CLUSTER", "16")
    monkeypatch.setattr(ops, "_capability", lambda index: (8, 0))
    assert ops.decode_cluster(8, 64, 640, 0) == (1, 64)
    for bad in ("32", "yes", "-1"):
        monkeypatch.setattr(ops, "DECODE_CLUSTER", bad)
        with pytest.raises(ValueError, match="ASERVE_DECODE_CLUSTER"):
            ops.decode_cluster(8, 64, 640, 0)


@pytest.mark.parametrize("arch", [80, 90])
def test_every_tensor_core_decode_build_compiles(arch):
    """The tensor-core kernel at each 16-bit type, head size and group it covers, and its
    tuning builds (bench/decode_attention.py --variants)."""
    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in ops.MMA_HEAD_SIZES:
            for block_size, group in ((16, 1), (16, 4), (32, 7), (16, ops.MAX_GROUP)):
                options = ops.paged_attention_options(dtype, head_dim, block_size, group)
                assert compiler.compile_cubin("paged_attention_mma.cu", options, arch)[:4] == b"\x7fELF"
    for tuning in ({"NUM_WARPS": 2, "STAGES": 3}, {"NUM_WARPS": 4, "STAGES": 3}, {"NUM_WARPS": 8, "STAGES": 2},
                   {"NUM_WARPS": 3, "STAGES": 2}):
        options = ops.paged_attention_options(torch.bfloat16, 128, 16, 4) + [f"-D{k}={v}" for k, v in tuning.items()]
        assert compiler.compile_cubin("paged_attention_mma.cu", options, arch)[:4] == b"\x7fELF", tuning


def test_tensor_core_decode_kernel_rejects_what_it_does_not_cover():
    """float32 and head sizes outside MMA_HEAD_SIZES stop at compile time, not in wrong results."""
    for dtype, head_dim in ((torch.float32, 128), (torch.bfloat16, 96), (torch.bfloat16, 256)):
        with pytest.raises(compiler.KernelCompileError, match="static assertion|must be"):
            compiler.compile_cubin("paged_attention_mma.cu", ops.paged_attention_options(dtype, head_dim, 16, 4), 90)


@pytest.mark.parametrize("arch", [80, 90])
def test_cache_ops_compile(arch):
    assert compiler.compile_cubin("cache_ops.cu", [], arch)[:4] == b"\x7fELF"


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype_id", [0, 1, 2])
def test_sampling_kernels_compile(arch, dtype_id):
    """sample_gumbel_max and argmax_rows, for logits of each dtype."""
    assert compiler.compile_cubin("sampling.cu", [f"-DDTYPE={dtype_id}"], arch)[:4] == b"\x7fELF"


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype_id", [0, 1, 2])
def test_fused_layer_ops_compile(arch, dtype_id):
    assert compiler.compile_cubin("layer_ops.cu", [f"-DDTYPE={dtype_id}"], arch)[:4] == b"\x7fELF"


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype_id", [0, 1, 2])
@pytest.mark.parametrize("rows", range(1, GEMV_MAX_ROWS + 1))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_gemv_build_compiles(arch, dtype_id, rows, variant):
    dtype = next(d for d, i in compiler.KERNEL_DTYPES.items() if i == dtype_id)
    assert compiler.compile_cubin("gemv.cu", gemv_options(dtype, rows, variant), arch)[:4] == b"\x7fELF"



@pytest.mark.parametrize("arch", [80, 90])
def test_graph_inputs_kernel_compiles(arch):
    assert compiler.compile_cubin("graph_inputs.cu", [], arch)[:4] == b"\x7fELF"


def test_cubins_are_cached_on_disk_per_options_and_arch(tmp_path):
    options = ops.paged_attention_options(torch.float16, 64, 16, 1)
    first = compiler.compile_cubin("paged_attention.cu", options, 90)
    cached = sorted((tmp_path / "cubins").iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == first
    assert compiler.compile_cubin("paged_attention.cu", options, 90) == first
    assert len(list((tmp_path / "cubins").iterdir())) == 1     # served from the cache
    compiler.compile_cubin("paged_attention.cu", options, 80)
    compiler.compile_cubin("paged_attention.cu", ops.paged_attention_options(torch.float16, 80, 16, 1), 90)
    assert len(list((tmp_path / "cubins").iterdir())) == 3


def test_compile_error_names_the_kernel_and_shows_nvrtc_log():
    bad = b'extern "C" __global__ void broken(float* x) { x[0] = undefined_name; }'
    with pytest.raises(compiler.KernelCompileError) as info:
        compiler._compile("broken.cu", bad, [], ["--gpu-architecture=sm_90"])
    message = str(info.value)
    assert "broken.cu" in message and "undefined_name" in message


def test_decode_group_size_divides_the_heads_per_kv_head():
    assert ops.decode_group_size(32, 8) == 4
    assert ops.decode_group_size(14, 2) == 7        # Qwen2-0.5B
    assert ops.decode_group_size(32, 1) == 8        # multi-query: 4 CTAs per KV head
    assert ops.decode_group_size(12, 12) == 1
    assert ops.decode_group_size(34, 2) == 1        # 17 heads per KV head: a prime above 8


def test_decode_kernel_choice(monkeypatch):
    """Tensor cores for 16-bit types, head sizes 64 and 128 and groups up to 8 on sm_80 and
    newer, by default only for groups of MMA_MIN_GROUP and launches of MMA_MIN_ROWS query heads
    per KV head; the CUDA-core kernel for the rest, and everywhere when forced."""
    monkeypatch.setattr(ops, "_capability", lambda index: (9, 0))
    mma, simt = "paged_attention_mma.cu", "paged_attention.cu"
    assert ops.decode_kernel_source(torch.bfloat16, 128, 4, 64, 0) == mma
    assert ops.decode_kernel_source(torch.float16, 64, 8, 32, 0) == mma
    assert ops.decode_kernel_source(torch.bfloat16, 128, 4, 63, 0) == simt         # a short batch
    assert ops.decode_kernel_source(torch.bfloat16, 128, 4, 1, 0) == simt
    assert ops.decode_kernel_source(torch.bfloat16, 128, 2, 256, 0) == simt        # small groups
    assert ops.decode_kernel_source(torch.float16, 64, 1, 256, 0) == simt
    assert ops.decode_kernel_source(torch.float32, 128, 4, 256, 0) == simt
    assert ops.decode_kernel_source(torch.bfloat16, 96, 4, 256, 0) == simt
    assert ops.decode_kernel_source(torch.bfloat16, 256, 4, 256, 0) == simt
    monkeypatch.setattr(ops, "DECODE_KERNEL", "mma")                                # where it applies
    assert ops.decode_kernel_source(torch.bfloat16, 128, 4, 1, 0) == mma
    assert ops.decode_kernel_source(torch.float16, 64, 1, 1, 0) == mma
    assert ops.decode_kernel_source(torch.float32, 128, 4, 256, 0) == simt
    monkeypatch.setattr(ops, "_capability", lambda index: (7, 5))
    assert ops.decode_kernel_source(torch.float16, 128, 4, 256, 0) == simt
    monkeypatch.setattr(ops, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(ops, "DECODE_KERNEL", "simt")
    assert ops.decode_kernel_source(torch.bfloat16, 128, 4, 256, 0) == simt
    monkeypatch.setattr(ops, "DECODE_KERNEL", "fast")
    with pytest.raises(ValueError, match="ASERVE_DECODE_KERNEL"):
        ops.decode_kernel_source(torch.bfloat16, 128, 4, 256, 0)


def test_launch_attributes_for_pdl_and_clusters():
    """cuLaunchKernelEx's attributes: programmatic serialization for PDL, the cluster shape
    (1 x 1 x n) for clustered launches, both together, none for a plain launch."""
    driver = compiler._driver()
    ids = driver.CUlaunchAttributeID
    assert compiler._launch_attributes(False, 1) == []
    (pdl,) = compiler._launch_attributes(True, 1)
    assert pdl.id == ids.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    assert pdl.value.programmaticStreamSerializationAllowed == 1
    first, cluster = compiler._launch_attributes(True, 16)
    assert first.id == ids.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    assert cluster.id == ids.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    assert (cluster.value.clusterDim.x, cluster.value.clusterDim.y, cluster.value.clusterDim.z) == (1, 1, 16)
    (alone,) = compiler._launch_attributes(False, 4)
    assert alone.value.clusterDim.z == 4
