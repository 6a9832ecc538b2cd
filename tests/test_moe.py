"""layers/moe.py: checkpoint names of one expert's matrix, incomplete checkpoints refused, the
mixture models kept off decode CUDA graphs by the default path, and the grouped-matmul path
(ASERVE_MOE_GROUPED_MM=1) against the default one and through the engine. (Their logits against
transformers are in test_models.py; greedy output, prefix caching and tensor parallelism in the
engine tests.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from aserve.config import EngineArgs
from aserve.distributed import SINGLE_RANK
from aserve.models import create_model_config, get_model_class
from aserve.models.layers.moe import Experts, expert_shard
from aserve.worker.runner_setup import uses_decode_graphs
from tiny_models import tiny_model_dir


@pytest.mark.parametrize("name, routed", [
    ("model.layers.3.mlp.experts.7.up_proj.weight", ("model.layers.3.mlp.experts.w13", (7, "up"))),
    ("model.layers.0.mlp.experts.12.gate_proj.weight", ("model.layers.0.mlp.experts.w13", (12, "gate"))),
    ("model.layers.1.mlp.experts.0.down_proj.weight", ("model.layers.1.mlp.experts.w2", (0, "down"))),
    ("model.layers.1.mlp.experts.2.w1.weight", ("model.layers.1.mlp.experts.w13", (2, "gate"))),
    ("model.layers.1.mlp.experts.2.w3.weight", ("model.layers.1.mlp.experts.w13", (2, "up"))),
    ("model.layers.1.mlp.experts.2.w2.weight", ("model.layers.1.mlp.experts.w2", (2, "down"))),
    ("model.layers.1.mlp.shared_expert.gate_proj.weight", None),
    ("model.layers.1.mlp.gate.weight", None),
])
def test_expert_matrices_route_to_the_stacked_parameters(name, routed):
    assert expert_shard(name) == routed


def _model_and_weights(family: str):
    path = tiny_model_dir(family)
    hf_config = create_model_config(EngineArgs(model=path, device="cpu")).hf_config
    return get_model_class(hf_config.architectures[0])(hf_config), load_file(f"{path}/model.safetensors")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_checkpoint_missing_one_experts_matrix_is_refused(family):
    model, weights = _model_and_weights(family)
    missing = next(name for name in weights if ".experts.3." in name and "layers.1." in name)
    del weights[missing]
    with pytest.raises(ValueError, match=r"lacks expert weights \[\(3, '(gate|up|down)'\)\]"):
        model.load_weights(weights.items())


def test_an_expert_the_config_does_not_have_is_refused():
    model, weights = _model_and_weights("qwen3_moe")
    weights["model.layers.0.mlp.experts.9.up_proj.weight"] = weights["model.layers.0.mlp.experts.0.up_proj.weight"]
    with pytest.raises(ValueError, match="expert 9"):
        model.load_weights(weights.items())


def test_mixture_models_run_without_decode_graphs():
    model, _ = _model_and_weights("mixtral")
    assert not model.supports_decode_graphs   # the default path reads counts back to the host
    args = EngineArgs(model=tiny_model_dir("mixtral"))
    assert not uses_decode_graphs(args, model, torch.device("cuda"), SINGLE_RANK)


def _experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, grouped: bool, seed: int) -> Experts:
    experts = Experts(num_experts, hidden, inter, grouped=grouped)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (experts.w13, experts.w2):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return experts.to(dtype)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("num_tokens", [1, 3, 40])
def test_the_grouped_path_equals_the_loop(dtype, tolerance, num_tokens):
    """Random tokens, routes and weights (some experts chosen by none, one token's choices
    all different): the grouped matmuls give the loop's sums within the dtype's rounding."""
    generator = torch.Generator().manual_seed(num_tokens)
    num_experts, k = 6, 2
    x = torch.randn(num_tokens, 32, generator=generator).to(dtype)
    top_ids = torch.stack([torch.randperm(num_experts - 2, generator=generator)[:k] for _ in range(num_tokens)])
    top_weights = torch.rand(num_tokens, k, generator=generator)   # float32, as Mixtral weighs
    loop = _experts(num_experts, 32, 16, dtype, grouped=False, seed=1)(x, top_ids, top_weights)
    grouped = _experts(num_experts, 32, 16, dtype, grouped=True, seed=1)(x, top_ids, top_weights)
    assert grouped.dtype == loop.dtype == dtype
    torch.testing.assert_close(grouped.float(), loop.float(), rtol=tolerance, atol=tolerance)


def test_the_grouped_path_lets_mixture_models_take_decode_graphs(monkeypatch):
    monkeypatch.setenv("ASERVE_MOE_GROUPED_MM", "1")
    model, _ = _model_and_weights("qwen2_moe")
    assert model.supports_decode_graphs   # nothing read back to the host any more


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "granitemoe"])
def test_the_grouped_path_gives_transformers_greedy_tokens(monkeypatch, family):
    """Through the engine (chunked prefill, several sequences at once), float32: the same
    greedy tokens as transformers, though sums run in another order than its loop."""
    from aserve import OfflineLLM, SamplingParams
    from hf_reference import hf_greedy, random_prompts

    monkeypatch.setenv("ASERVE_MOE_GROUPED_MM", "1")
    llm = OfflineLLM(model=tiny_model_dir(family), device="cpu", dtype="float32", kv_cache_memory_gb=0.05,
                     max_num_batched_tokens=32)
    assert all(m.grouped for m in llm.engine.model.modules() if isinstance(m, Experts))
    prompts = random_prompts(7, [5, 40, 17])
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == [hf_greedy(tiny_model_dir(family), p, 12) for p in prompts]


def test_the_grouped_path_over_two_gloo_ranks_gives_transformers_greedy_tokens(monkeypatch):
    """Each rank's experts hold half of every expert's intermediate size; the grouped partial
    sums all-reduce to transformers' tokens (the worker processes inherit the switch)."""
    from aserve import OfflineLLM, SamplingParams
    from hf_reference import hf_greedy, random_prompts

    monkeypatch.setenv("ASERVE_MOE_GROUPED_MM", "1")
    path = tiny_model_dir("qwen3_moe")
    llm = OfflineLLM(model=path, device="cpu", dtype="float32", kv_cache_memory_gb=0.05, tensor_parallel_size=2)
    try:
        prompts = random_prompts(9, [6, 23])
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == [hf_greedy(path, p, 10) for p in prompts]
    finally:
        llm.shutdown()
