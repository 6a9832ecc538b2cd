"""Tensor parallelism on GPUs (GPU only): the same tokens as one rank and as transformers.

With two GPUs or more, the ranks run NCCL, with CUDA graphs (which capture its all-reduces)
and without. On a one-GPU machine the two ranks share the card over gloo (ASERVE_TP_BACKEND),
which runs the whole worker machinery on CUDA tensors; gloo's collectives cannot be captured,
so graphs are off there.
"""

from __future__ import annotations

import pytest
import torch

from aserve import OfflineLLM, SamplingParams
from hf_reference import hf_greedy, random_prompts
from tiny_models import FAMILIES, tiny_model_dir

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPT_LENGTHS = [3, 17, 40, 9, 1, 26]


@pytest.fixture
def tp_backend(monkeypatch):
    if torch.cuda.device_count() >= 2:
        return "nccl"
    monkeypatch.setenv("ASERVE_TP_BACKEND", "gloo")   # the spawned workers inherit it
    return "gloo"


@pytest.mark.parametrize("enforce_eager", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_on_gpus_gives_the_tokens_of_transformers(family, enforce_eager, tp_backend):
    if tp_backend == "gloo" and not enforce_eager:
        pytest.skip("ranks sharing one GPU run gloo, whose collectives CUDA graphs cannot capture")
    path = tiny_model_dir(family)
    prompts = random_prompts(4, PROMPT_LENGTHS)
    with OfflineLLM(model=path, dtype="float32", kv_cache_memory_gb=0.25, tensor_parallel_size=2,
                    enforce_eager=enforce_eager) as llm:
        graphs = llm.engine.runner.decode_graphs
        capturable = getattr(llm.engine.model, "supports_decode_graphs", True)   # not MoE, not Gemma 2
        assert (graphs is not None) == (tp_backend == "nccl" and not enforce_eager and capturable)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        if graphs is not None:
            assert graphs.num_replays > 0
    assert got == [hf_greedy(path, p, GREEDY.max_tokens) for p in prompts]


def test_tp2_bfloat16_async_steps_equal_sync_steps(tp_backend):
    path = tiny_model_dir("llama")
    prompts = random_prompts(6, [50, 7, 21])
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    got = []
    for async_scheduling in (True, False):
        with OfflineLLM(model=path, dtype="bfloat16", kv_cache_memory_gb=0.25, tensor_parallel_size=2,
                        async_scheduling=async_scheduling) as llm:
            got.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert got[0] == got[1]
