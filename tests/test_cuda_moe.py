"""The mixtures of experts' grouped-matmul path (ASERVE_MOE_GROUPED_MM=1, layers/moe.py) on a
GPU: torch._grouped_mm takes the experts' stacked weights, nothing is read back to the host,
so decode steps are captured in CUDA graphs, and the tokens are transformers' (float32) and
the eager engine's (bfloat16). GPU only; the CPU tests hold the path to the loop."""

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


def _llm(family: str, dtype: str, **kwargs) -> OfflineLLM:
    llm = OfflineLLM(model=tiny_model_dir(family), dtype=dtype, kv_cache_memory_gb=0.25, **kwargs)
    assert all(m.grouped for m in llm.engine.model.modules() if isinstance(m, Experts))
    return llm


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_grouped_experts_take_decode_graphs_and_give_transformers_tokens(family, monkeypatch):
    monkeypatch.setenv("ASERVE_MOE_GROUPED_MM", "1")
    prompts = random_prompts(4, PROMPT_LENGTHS)
    llm = _llm(family, "float32")
    graphs = llm.engine.runner.decode_graphs
    assert graphs is not None
    replays = graphs.num_replays
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert graphs.num_replays > replays, "decode steps did not replay the captured graphs"
    assert got == [hf_greedy(tiny_model_dir(family), p, GREEDY.max_tokens) for p in prompts]


def test_grouped_experts_in_bfloat16_graphs_equal_eager(monkeypatch):
    monkeypatch.setenv("ASERVE_MOE_GROUPED_MM", "1")
    prompts = random_prompts(5, PROMPT_LENGTHS)
    with_graphs, eager = _llm("qwen2_moe", "bfloat16"), _llm("qwen2_moe", "bfloat16", enforce_eager=True)
    assert with_graphs.engine.runner.decode_graphs is not None and eager.engine.runner.decode_graphs is None
    got = [o.outputs[0].token_ids for o in with_graphs.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == [o.outputs[0].token_ids for o in eager.generate(prompts, GREEDY, use_tqdm=False)]
