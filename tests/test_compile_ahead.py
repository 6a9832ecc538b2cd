"""The kernel builds compiled ahead while a model loads (aserve/cuda/compile_ahead.py): the
prediction from a model's shape, the worker threads' cubins (NVRTC needs no GPU), the loads
that wait for them, and on a GPU that a first start loads nothing that was not predicted."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from aserve.cuda import compile_ahead, compiler, cubins, gemv, ops

needs_nvrtc = pytest.mark.skipif(not compiler.nvrtc_available(),
                                 reason='NVRTC is not installed (pip install "cuda-python[all]")')


@pytest.fixture(autouse=True)
def fresh_cubin_cache(tmp_path, monkeypatch):
    """An empty disk cache (a first start on a machine) and no compiles in flight."""
    monkeypatch.setenv("ASERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cubins, "_ahead", {})


def _llama_8b_shape(**overrides):
    return LlamaConfig(**{**dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                 intermediate_size=14336, num_hidden_layers=32), **overrides})


def test_builds_follow_the_model_shape_per_rank(monkeypatch):
    monkeypatch.setattr(ops, "_capability", lambda index: (9, 0))
    builds = compile_ahead.model_kernel_builds(_llama_8b_shape(), torch.bfloat16, 16, 1, 0)
    assert ("layer_ops.cu", ["-DDTYPE=2"]) in builds and ("sampling.cu", ["-DDTYPE=2"]) in builds
    assert ("cache_ops.cu", []) in builds
    # 32 query heads over 8 KV heads: groups of 4, so large batches take the tensor cores.
    plain = ops.paged_attention_options(torch.bfloat16, 128, 16, 4)
    assert ("paged_attention.cu", plain) in builds and ("paged_attention_mma.cu", plain) in builds
    assert ("paged_attention.cu", ops.paged_attention_options(torch.bfloat16, 128, 16, 4, True)) in builds
    assert all(build in builds for build in gemv.gemv_builds(torch.bfloat16))
    assert len(builds) == len({(s, tuple(o)) for s, o in builds})    # each once
    # Eight ranks: one KV head and four query heads each, the same group; 16 ranks replicate the
    # KV heads (one a rank) beside two query heads: groups of 2, which the tensor cores do not take.
    assert compile_ahead.model_kernel_builds(_llama_8b_shape(), torch.bfloat16, 16, 8, 0) == builds
    sixteen = compile_ahead.model_kernel_builds(_llama_8b_shape(), torch.bfloat16, 16, 16, 0)
    assert ("paged_attention.cu", ops.paged_attention_options(torch.bfloat16, 128, 16, 2)) in sixteen
    assert not any(source == "paged_attention_mma.cu" for source, _ in sixteen)


def test_builds_before_hopper_and_for_head_sizes_without_a_decode_kernel(monkeypatch):
    monkeypatch.setattr(ops, "_capability", lambda index: (8, 0))
    builds = compile_ahead.model_kernel_builds(_llama_8b_shape(), torch.float16, 16, 1, 0)
    assert not any("-DCLUSTER_COMBINE=1" in options for _, options in builds)
    odd_heads = compile_ahead.model_kernel_builds(_llama_8b_shape(head_dim=48), torch.float16, 16, 1, 0)
    assert not any(source.startswith("paged_attention") for source, _ in odd_heads)
    assert ("layer_ops.cu", ["-DDTYPE=1"]) in odd_heads


def test_the_gemv_builds_are_every_geometry_a_decode_step_may_take():
    builds = gemv.gemv_builds(torch.float16)
    for rows in range(1, gemv.GEMV_MAX_ROWS + 1):
        for variant in gemv.VARIANTS:
            assert ("gemv.cu", gemv.gemv_options(torch.float16, rows, variant)) in builds
    if gemv._deep is not None:
        for rows in gemv.DEEP_ROWS:
            assert ("gemv.cu", gemv.gemv_options(torch.float16, rows, gemv.PLAIN, gemv._deep)) in builds


@needs_nvrtc
def test_builds_compiled_ahead_land_in_the_cache_and_loads_take_them(tmp_path):
    builds = [("layer_ops.cu", ["-DDTYPE=1"]), ("cache_ops.cu", []),
              ("gemv.cu", gemv.gemv_options(torch.float16, 1))]
    assert compiler.compile_ahead(builds, 90) == 3
    assert compiler.compile_ahead(builds, 90) == 0     # in flight already
    for source, options in builds:
        cubin = compiler.cubin_for(source, options, 90)   # waits for its worker
        assert cubin[:4] == b"\x7fELF"
        assert compiler.compile_cubin(source, options, 90) == cubin   # the disk cache's copy
    assert len(list((tmp_path / "cubins").glob("*.cubin"))) == 3
    cubins._ahead.clear()
    assert compiler.compile_ahead(builds, 90) == 0     # cached on disk now


@needs_nvrtc
def test_a_build_that_fails_ahead_fails_again_where_it_is_loaded():
    broken = ("gemv.cu", ["-DROWS=1", "-DUNROLL=x"])   # not a number: gemv.cu does not compile
    assert compiler.compile_ahead([broken], 90) == 1
    cubins._ahead[(broken[0], tuple(broken[1]), 90)].exception()   # finished, and only logged
    with pytest.raises(compiler.KernelCompileError, match="gemv.cu"):
        compiler.cubin_for(*broken, 90)


@needs_nvrtc
def test_a_start_compiles_the_model_builds_unless_turned_off(monkeypatch, tmp_path):
    """start_for_model as a start on an sm_90 card calls it (the card's capability stood in);
    the builds land in the cache. Off a GPU, and with ASERVE_COMPILE_AHEAD=0, nothing starts."""
    monkeypatch.setattr(ops, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(compile_ahead, "capability", lambda index: (9, 0))
    config, card = _llama_8b_shape(), torch.device("cuda", 0)
    assert compile_ahead.start_for_model(config, torch.bfloat16, 16, 1, torch.device("cpu")) == 0
    monkeypatch.setenv("ASERVE_COMPILE_AHEAD", "0")
    assert compile_ahead.start_for_model(config, torch.bfloat16, 16, 1, card) == 0
    monkeypatch.setenv("ASERVE_COMPILE_AHEAD", "1")
    builds = compile_ahead.model_kernel_builds(config, torch.bfloat16, 16, 1, 0)
    assert compile_ahead.start_for_model(config, torch.bfloat16, 16, 1, card) == len(builds)
    for source, options in builds:
        assert compiler.cubin_for(source, options, 90)[:4] == b"\x7fELF"
    assert len(list((tmp_path / "cubins").glob("*.cubin"))) == len(builds)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_first_start_loads_only_predicted_builds(monkeypatch, dtype):
    """An engine started on an empty cache, then generating at batch 1 and at a larger batch:
    every module the process loads was among the builds compiled ahead."""
    from aserve import OfflineLLM, SamplingParams
    from tiny_models import tiny_model_dir

    monkeypatch.setattr(compiler, "_modules", {})   # loaded by earlier tests: load them again
    monkeypatch.setattr(gemv, "_plans", {})
    llm = OfflineLLM(model=tiny_model_dir("llama"), dtype=dtype, kv_cache_memory_gb=0.25, max_num_seqs=300)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([[5, 6, 7]], params, use_tqdm=False)
    llm.generate([[5, 6, 7, i] for i in range(300)], params, use_tqdm=False)
    config = llm.engine.model_config
    predicted = {(source, tuple(options)) for source, options in compile_ahead.model_kernel_builds(
        config.hf_config, config.dtype, 16, 1, torch.cuda.current_device())}
    loaded = {(source, options) for source, options, _ in compiler._modules}
    assert loaded and loaded <= predicted, loaded - predicted
