"""OLMoE (OlmoeForCausalLM: AllenAI's OLMoE-1B-7B): Llama's pre-norm layers with a mixture of
SiLU-gated experts in place of every MLP (top-k of the router's softmax, renormalised only where
norm_topk_prob says so), an RMSNorm over the whole q and the whole k projection (spanning the
tensor-parallel ranks, as OLMo 2's), and q, k and v clamped to clip_qkv where the config sets it.
"""

from __future__ import annotations

from aserve.distributed import current_group
from aserve.models.layers.moe import CapturableWhenGrouped, MoEBlock
from aserve.models.llama import LlamaAttention, LlamaForCausalLM
from aserve.models.olmo2 import Olmo2RMSNorm


class OlmoeAttention(LlamaAttention):
    def __init__(self, config, layer_idx: int, qkv_bias: bool, o_bias: bool):
        super().__init__(config, layer_idx, qkv_bias, o_bias)
        eps, rank = config.rms_norm_eps, current_group().rank
        self.q_norm = Olmo2RMSNorm(self.q_size, eps, sharded=True, weight_in_float32=False)
        self.k_norm = Olmo2RMSNorm(self.kv_size, eps, sharded=True, weight_in_float32=False,
                                   shard_of_rank=rank // self.qkv_proj.num_kv_head_replicas)
        self.clip = getattr(config, "clip_qkv", None)

    def forward(self, positions, hidden_states, kv_cache, attn_metadata):
        q, k, v = self.split_qkv(hidden_states)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        return self.attend(positions, q, k, v, kv_cache, attn_metadata)


class OlmoeMoE(MoEBlock):
    def __init__(self, config, layer_idx: int):
        super().__init__(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                         config.intermediate_size, renormalize=bool(config.norm_topk_prob),
                         float32_weights=False)


class OlmoeForCausalLM(CapturableWhenGrouped, LlamaForCausalLM):
    attention_class = OlmoeAttention
    make_mlp = staticmethod(OlmoeMoE)
