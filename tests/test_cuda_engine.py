"""The engine on a GPU: CUDA graphs change nothing in the output (GPU only)."""

from __future__ import annotations

import pytest
import torch

from aserve import SamplingParams
from hf_reference import hf_greedy, random_prompts
from tiny_models import FAMILIES, make_tiny_model, tiny_model_dir

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPT_LENGTHS = [3, 17, 40, 9, 1, 26]


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graphs_on_and_off_give_the_same_tokens_as_transformers(family, llm_cache):
    prompts = random_prompts(4, PROMPT_LENGTHS)
    with_graphs = llm_cache(family)
    graphs = with_graphs.engine.runner.decode_graphs
    expected = [hf_greedy(tiny_model_dir(family), p, GREEDY.max_tokens) for p in prompts]
    if not getattr(with_graphs.engine.model, "supports_decode_graphs", True):
        # Mixtures of experts and Gemma 2's capped attention run eagerly (they read back to
        # the host inside the forward).
        assert graphs is None
        assert [o.outputs[0].token_ids for o in with_graphs.generate(prompts, GREEDY, use_tqdm=False)] == expected
        return
    eager = llm_cache(family, enforce_eager=True)
    assert graphs is not None and eager.engine.runner.decode_graphs is None
    replays = graphs.num_replays
    got = [o.outputs[0].token_ids for o in with_graphs.generate(prompts, GREEDY, use_tqdm=False)]
    assert graphs.num_replays > replays, "decode steps did not replay the captured graphs"
    assert got == [o.outputs[0].token_ids for o in eager.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == expected


def test_attention_runs_on_the_cuda_backend(llm_cache):
    llm = llm_cache("llama")
    llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    backends = {m.backend.name for m in llm.engine.model.modules() if hasattr(m, "backend") and m.backend}
    assert backends == {"cuda"}


def test_bfloat16_chunked_prefill_and_graphs_agree_with_eager(llm_cache):
    """The flash-attention prompt path (fresh prompts and chunks over cached context) and the
    decode graphs in bfloat16 give what the eager engine gives with whole prompts."""
    prompts = random_prompts(5, [60, 33, 90])
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)
    chunked = llm_cache("llama", dtype="bfloat16", max_num_batched_tokens=32)
    whole = llm_cache("llama", dtype="bfloat16", enforce_eager=True)
    a = chunked.generate(prompts, params, use_tqdm=False)
    b = whole.generate(prompts, params, use_tqdm=False)
    for x, y in zip(a, b):
        # bf16 rounding differs with the batch shape: compare the first tokens' logprobs loosely.
        lx = x.outputs[0].logprobs[0][x.outputs[0].token_ids[0]].logprob
        ly = y.outputs[0].logprobs[0][y.outputs[0].token_ids[0]].logprob
        assert abs(lx - ly) < 0.1


def test_bfloat16_cached_prefixes_agree_with_computing_them(llm_cache):
    """Chunks over a cached prefix (flash attention over context gathered from the paged
    cache) give what computing the whole prompt gives, in bfloat16 with graphs on."""
    system = random_prompts(8, [70])[0]
    prompts = [system + p for p in random_prompts(9, [5, 12, 30])]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)
    cached = llm_cache("llama", dtype="bfloat16", enable_prefix_caching=True)
    plain = llm_cache("llama", dtype="bfloat16", enable_prefix_caching=False)
    cached.generate([system + [7, 7]], params, use_tqdm=False)
    a = cached.generate(prompts, params, use_tqdm=False)
    b = plain.generate(prompts, params, use_tqdm=False)
    assert all(o.num_cached_tokens == 64 for o in a)
    for x, y in zip(a, b):
        lx = x.outputs[0].logprobs[0][x.outputs[0].token_ids[0]].logprob
        ly = y.outputs[0].logprobs[0][y.outputs[0].token_ids[0]].logprob
        assert abs(lx - ly) < 0.1


def _logprob_errors(reference, outputs) -> tuple[list[float], int]:
    """|logprob - reference logprob| of each generated token while a sequence still follows the
    reference's tokens, and how many sequences follow it to the end."""
    errors, same = [], 0
    for ref, out in zip(reference, outputs):
        same += ref.token_ids == out.token_ids
        for pos, token in enumerate(ref.token_ids):
            if out.token_ids[:pos + 1] != ref.token_ids[:pos + 1]:
                break
            errors.append(abs(out.logprobs[pos][token].logprob - ref.logprobs[pos][token].logprob))
    return errors, same


def test_tensor_core_decode_is_as_accurate_as_the_cuda_core_kernel(tmp_path, monkeypatch):
    """A grouped-query model (4 query heads per KV head, head size 64) in bfloat16 with 64
    sequences decoding together: where the tensor-core decode kernel runs by default. Against
    the same model in float32 (the CUDA-core kernel in float32 arithmetic throughout), its
    tokens and logprobs are about as close as the CUDA-core kernel's in bfloat16. One value is
    no criterion: bfloat16 alone moves this tiny model's logprobs (logits of standard deviation
    4-8) by 0.043 on average and 0.27 at most from float32, with 37 of the 64 sequences
    identical (the CPU's reference attention), and the kernels' roundings moved one logprob by
    0.17 between them on an H200. So the criteria are the mean error over ~600 tokens and how
    many sequences follow float32 to the end."""
    from aserve import OfflineLLM
    from aserve.cuda import ops

    assert ops.decode_kernel_source(torch.bfloat16, 64, 4, 64, 0) == "paged_attention_mma.cu"
    path = make_tiny_model("llama", tmp_path / "gqa", num_key_value_heads=1)
    prompts = random_prompts(21, [5 + (7 * i) % 90 for i in range(64)])
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    exact = OfflineLLM(model=path, dtype="float32", enforce_eager=True, kv_cache_memory_gb=0.25)
    reference = [o.outputs[0] for o in exact.generate(prompts, params, use_tqdm=False)]
    llm = OfflineLLM(model=path, dtype="bfloat16", enforce_eager=True, kv_cache_memory_gb=0.25)
    errors, same = {}, {}
    for kernel in ("simt", "mma"):
        monkeypatch.setattr(ops, "DECODE_KERNEL", kernel)
        outputs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        errors[kernel], same[kernel] = _logprob_errors(reference, outputs)
    mean = {k: sum(e) / len(e) for k, e in errors.items()}
    assert mean["mma"] <= 1.5 * mean["simt"] + 0.01, (mean, same)
    assert same["mma"] >= 0.75 * same["simt"], (mean, same)


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_decode_ops_folded_into_the_gemvs_change_no_bit(llm_cache, monkeypatch, family):
    """OPT's query scaling, ReLU and residual adds, and GPT-2's residual adds, run in the GEMVs'
    epilogues in decode steps (models/layers/linear.py fused_linear): the same tokens and
    logprobs as the separate ops."""
    import importlib

    model_module = importlib.import_module(f"aserve.models.{family}")
    llm = llm_cache(family, dtype="float16", enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    prompts = random_prompts(41, [6, 30, 2])
    folded_calls = []

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        folded_calls.append(out is not None)
        return out

    real = model_module.fused_linear
    monkeypatch.setattr(model_module, "fused_linear", counting)
    folded = llm.generate(prompts, params, use_tqdm=False)
    assert any(folded_calls)
    monkeypatch.setattr(model_module, "fused_linear", lambda *args, **kwargs: None)
    separate = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(folded, separate):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [{t: lp.logprob for t, lp in step.items()} for step in a.outputs[0].logprobs] == \
            [{t: lp.logprob for t, lp in step.items()} for step in b.outputs[0].logprobs]
