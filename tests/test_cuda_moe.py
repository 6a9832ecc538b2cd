"""The mixtures of experts' grouped-matmul path (ASERVE_MOE_GROUPED_MM=1, layers/moe.py) on a
GPU: in bfloat16 on Hopper or Blackwell torch._grouped_mm takes the experts' stacked weights,
nothing is read back to the host, so decode steps are captured in CUDA graphs, and the tokens
are the eager engine's; its sums are the loop's within bfloat16's rounding. In float32 torch
has no grouped kernel (its fallback reads the groups to the host, which no graph can hold), so
the experts take the loop, without graphs, and the tokens are transformers'. GPU only; the CPU
tests hold the path to the loop."""

from __future__ import annotations

import pytest
import torch

from aserve import OfflineLLM, SamplingParams
from aserve.models.layers.moe import Experts
from hf_reference import hf_greedy, random_prompts
from tiny_models import tiny_model_dir

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPT_LENGTHS = [3, 17, 40, 9, 1, 26]


needs_native_grouped_mm = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10),
    reason="torch's grouped kernel runs on compute capability 9.x and 10.x")


def _llm(family: str, dtype: str, **kwargs) -> OfflineLLM:
    llm = OfflineLLM(model=tiny_model_dir(family), dtype=dtype, kv_cache_memory_gb=0.25, **kwargs)
    assert all(m.grouped for m in llm.engine.model.modules() if isinstance(m, Experts))
    return llm


def _takes_grouped_path(llm: OfflineLLM) -> list[bool]:
    return [m.takes_grouped_path for m in llm.engine.model.modules() if isinstance(m, Experts)]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_float32_experts_take_the_loop_without_graphs_and_give_transformers_tokens(family, monkeypatch):
    monkeypatch.setenv("ASERVE_MOE_GROUPED_MM", "1")
    prompts = random_prompts(4, PROMPT_LENGTHS)
    llm = _llm(family, "float32")
    assert not any(_takes_grouped_path(llm))
    assert llm.engine.runner.decode_graphs is None
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == [hf_greedy(tiny_model_dir(family), p, GREEDY.max_tokens) for p in prompts]


@needs_native_grouped_mm
def test_grouped_experts_in_bfloat16_graphs_equal_eager(monkeypatch):
    monkeypatch.setenv("ASERVE_MOE_GROUPED_MM", "1")
    prompts = random_prompts(5, PROMPT_LENGTHS)
    with_graphs, eager = _llm("qwen2_moe", "bfloat16"), _llm("qwen2_moe", "bfloat16", enforce_eager=True)
    assert all(_takes_grouped_path(with_graphs))
    graphs = with_graphs.engine.runner.decode_graphs
    assert graphs is not None and eager.engine.runner.decode_graphs is None
    replays = graphs.num_replays
    got = [o.outputs[0].token_ids for o in with_graphs.generate(prompts, GREEDY, use_tqdm=False)]
    assert graphs.num_replays > replays, "decode steps did not replay the captured graphs"
    assert got == [o.outputs[0].token_ids for o in eager.generate(prompts, GREEDY, use_tqdm=False)]


@needs_native_grouped_mm
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 300])
def test_grouped_sum_is_the_loops_within_bfloat16_rounding(num_tokens):
    """Fresh random bfloat16 weights and inputs (Qwen3-30B-A3B's expert count and top-k at a
    small width), some experts left without tokens: the grouped path's output against the
    loop's, computed from the same bfloat16 values."""
    torch.manual_seed(num_tokens)
    experts, hidden, intermediate, k = 128, 256, 128, 8
    grouped = Experts(experts, hidden, intermediate, grouped=True).cuda().to(torch.bfloat16)
    loop = Experts(experts, hidden, intermediate, grouped=False).cuda().to(torch.bfloat16)
    w13 = torch.randn(experts, 2 * intermediate, hidden) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, intermediate) / intermediate ** 0.5
    for module in (grouped, loop):   # the same weights in both
        module.w13.data.copy_(w13)
        module.w2.data.copy_(w2)
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    top_ids = torch.stack([torch.randperm(experts // 2, device="cuda")[:k] for _ in range(num_tokens)])
    top_weights = torch.softmax(torch.randn(num_tokens, k, device="cuda"), dim=-1).to(torch.bfloat16)
    assert grouped.takes_grouped_path and not loop.takes_grouped_path
    got, want = grouped(x, top_ids, top_weights).float(), loop(x, top_ids, top_weights).float()
    assert torch.linalg.norm(got - want) <= 2e-2 * torch.linalg.norm(want)
