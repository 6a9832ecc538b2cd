"""The CUDA kernel builds a model will load, compiled together in worker threads while its
weights load.

On a machine whose cubin cache (cubins.py) is empty, a start used to compile each build the
moment the profiling forward or a decode graph's warm-up first reached it, one after another:
~20 builds, 7.7 s of model B's 11.5 s first start on an H200 host (bench/RESULTS.md,
twenty-second session). The builds follow from the model's shape and each kernel module's own
option functions, so they are predicted here and started at once. A build missed here is
compiled where it is loaded, as before; one predicted in vain only costs a worker thread's time.
"""

from __future__ import annotations

import logging

import torch

from aserve.cuda.compiler import KERNEL_DTYPES, capability, env_switch
from aserve.cuda.cubins import compile_ahead
from aserve.cuda.fused import kernels_enabled
from aserve.cuda.gemv import gemv_builds
from aserve.cuda.graph_inputs import graph_inputs_kernel_enabled
from aserve.cuda.ops import decode_builds, decode_group_size

logger = logging.getLogger(__name__)

# ASERVE_COMPILE_AHEAD=0: compile each build only where it is first loaded (the way before).
COMPILE_AHEAD_ENV = "ASERVE_COMPILE_AHEAD"


def model_kernel_builds(hf_config, dtype: torch.dtype, block_size: int, tp_size: int,
                        device_index: int) -> list[tuple[str, list[str]]]:
    """(source, options) of every build one tensor-parallel rank of this model may load: the
    layer ops and sampling kernels in its dtype, the decode attention of its head shape per
    rank, and the decode GEMVs."""
    if dtype not in KERNEL_DTYPES:
        return []
    dtype_option = [f"-DDTYPE={KERNEL_DTYPES[dtype]}"]
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    # KV heads are replicated where there are fewer than ranks (layers/linear.py): one a rank.
    group = decode_group_size(max(1, heads // tp_size), max(1, kv_heads // tp_size))
    builds = [("layer_ops.cu", dtype_option), ("sampling.cu", dtype_option),
              *decode_builds(dtype, head_dim, block_size, group, device_index), *gemv_builds(dtype)]
    if graph_inputs_kernel_enabled():
        builds.append(("graph_inputs.cu", []))
    return builds


def start_for_model(hf_config, dtype: torch.dtype, block_size: int, tp_size: int, device: torch.device) -> int:
    """Start compiling the model's builds that are not cached yet (none off a GPU, with the
    kernels off, or with ASERVE_COMPILE_AHEAD=0); returns how many were started. A failure to
    predict is logged, never raised: the loads compile what they need either way."""
    if device.type != "cuda" or not kernels_enabled() or not env_switch(COMPILE_AHEAD_ENV, "1"):
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        major, minor = capability(index)
        started = compile_ahead(model_kernel_builds(hf_config, dtype, block_size, tp_size, index), major * 10 + minor)
    except Exception as exc:   # an odd config: the builds are compiled as they are loaded instead
        logger.warning("could not compile the CUDA kernels ahead (%s: %s); they compile as they are first used",
                       type(exc).__name__, exc)
        return 0
    if started:
        logger.info("compiling %d CUDA kernel builds in the background (none cached on this machine yet)", started)
    return started
