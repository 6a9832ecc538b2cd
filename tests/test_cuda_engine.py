"""The engine on a GPU: CUDA graphs change nothing in the output (GPU only)."""

from __future__ import annotations

import pytest
import torch

from aserve import SamplingParams
from hf_reference import hf_greedy, random_prompts
from tiny_models import FAMILIES, tiny_model_dir

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPT_LENGTHS = [3, 17, 40, 9, 1, 26]


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graphs_on_and_off_give_the_same_tokens_as_transformers(family, llm_cache):
    prompts = random_prompts(4, PROMPT_LENGTHS)
    with_graphs = llm_cache(family)
    eager = llm_cache(family, enforce_eager=True)
    graphs = with_graphs.engine.runner.decode_graphs
    assert graphs is not None and eager.engine.runner.decode_graphs is None
    replays = graphs.num_replays
    got = [o.outputs[0].token_ids for o in with_graphs.generate(prompts, GREEDY, use_tqdm=False)]
    assert graphs.num_replays > replays, "decode steps did not replay the captured graphs"
    assert got == [o.outputs[0].token_ids for o in eager.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == [hf_greedy(tiny_model_dir(family), p, GREEDY.max_tokens) for p in prompts]


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
