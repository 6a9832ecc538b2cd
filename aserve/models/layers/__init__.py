"""Building blocks shared by the model families; each owns its tensor-parallel sharding."""

from aserve.models.layers.activation import SiluAndMul, get_act_fn
from aserve.models.layers.attention import Attention
from aserve.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from aserve.models.layers.layernorm import LayerNorm, RMSNorm
from aserve.models.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                         QKVParallelLinear, ReplicatedLinear, RowParallelLinear,
                                         default_weight_loader, load_named_weights)
from aserve.models.layers.rotary import RotaryEmbedding, get_rope_parameters

__all__ = ["Attention", "ColumnParallelLinear", "LayerNorm", "MergedColumnParallelLinear",
           "ParallelLMHead", "QKVParallelLinear", "RMSNorm", "ReplicatedLinear", "RotaryEmbedding",
           "RowParallelLinear", "SiluAndMul", "VocabParallelEmbedding", "default_weight_loader",
           "get_act_fn", "get_rope_parameters", "load_named_weights"]
