"""One rank's model side, built the same way on every rank: the model shard, the KV cache
sized from this rank's memory and agreed over all ranks, and the decode CUDA graphs.

Every rank runs exactly these steps in this order, because several of them (the profiling
forward, the agreements, the graph captures) are collectives that all ranks must join.
"""

from __future__ import annotations

import functools
import logging

import torch

from aserve.attention import get_attention_backend
from aserve.config import EngineArgs, ModelConfig
from aserve.cuda.compile_ahead import start_for_model as start_compiling_kernels
from aserve.cuda.library_prefetch import start_prefetch as start_library_prefetch
from aserve.distributed import SINGLE_RANK, TensorParallelGroup
from aserve.models.loader import load_model
from aserve.worker.kv_cache import allocate_kv_caches, num_blocks_for_budget
from aserve.worker.memory_profile import profile_forward
from aserve.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def uses_decode_graphs(args: EngineArgs, model, device: torch.device, group: TensorParallelGroup) -> bool:
    """CUDA graphs bake in the CUDA kernels' launches (the torch reference plans on the host)
    and the collectives (gloo's run on the host, so only NCCL's can be captured); a model whose
    forward reads values back to the host (a mixture of experts: layers/moe.py) cannot be
    captured either."""
    return (device.type == "cuda" and not args.enforce_eager and group.collectives_capturable
            and getattr(model, "supports_decode_graphs", True)
            and get_attention_backend(device, model.head_dim).name == "cuda")


def build_model_runner(args: EngineArgs, model_config: ModelConfig, device: torch.device,
                       group: TensorParallelGroup = SINGLE_RANK) -> ModelRunner:
    """This rank's ModelRunner, its KV cache holding the number of blocks every rank can hold."""
    # The kernels compile in worker threads while the weights load (a first start on a machine),
    # and, where asked, the CUDA libraries are read ahead into the page cache.
    if device.type == "cuda":
        start_library_prefetch()
    start_compiling_kernels(model_config.hf_config, model_config.dtype, args.block_size, group.world_size, device)
    model = load_model(model_config, device, group)
    max_len = model_config.max_model_len
    profile = functools.partial(
        profile_forward, model, device, model_config.dtype, args.resolve_max_num_batched_tokens(device),
        max_len, args.resolve_max_num_seqs(device), args.block_size)
    num_blocks = args.num_gpu_blocks_override or num_blocks_for_budget(
        model, args.block_size, model_config.dtype, device, args.kv_cache_memory_gb,
        args.gpu_memory_utilization, profile)
    # Every rank holds the same block tables, so every rank's cache has the smallest count.
    num_blocks = group.min_over_ranks(num_blocks)
    kv_caches = allocate_kv_caches(model, num_blocks, args.block_size, model_config.dtype, device)
    pooling = args.runner == "pooling"
    runner = ModelRunner(model, kv_caches, args.block_size, device, args.seed, group, pooling=pooling)
    # A pooling engine runs prompts only: no decode step to capture.
    if not pooling and group.all_ranks_agree(uses_decode_graphs(args, model, device, group)):
        runner.capture_decode_graphs(args.resolve_max_num_seqs(device), min(max_len, args.max_seq_len_to_capture))
    return runner
