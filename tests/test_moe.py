"""layers/moe.py: checkpoint names of one expert's matrix, incomplete checkpoints refused, and
the mixture models kept off decode CUDA graphs. (Their logits against transformers are in
test_models.py; greedy output, prefix caching and tensor parallelism in the engine tests.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from aserve.config import EngineArgs
from aserve.distributed import SINGLE_RANK
from aserve.models import create_model_config, get_model_class
from aserve.models.layers.moe import expert_shard
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
    args = EngineArgs(model=tiny_model_dir("mixtral"))
    assert not uses_decode_graphs(args, model, torch.device("cuda"), SINGLE_RANK)
