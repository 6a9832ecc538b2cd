"""Linear layers sharded over tensor-parallel ranks, as in vLLM / Megatron.

Column-parallel layers split the output features: each rank holds out/world rows of the weight.
Row-parallel layers split the input features and all-reduce the partial outputs. Every
parameter carries `weight_loader(param, loaded_weight, shard_id=None)`, which copies this
rank's slice of a full checkpoint tensor, so model files never slice weights themselves.
Weights are [out, in] like torch.nn.Linear (GPT-2's Conv1D weights are transposed by its model).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aserve.cuda.gemv import GEMV_MAX_ROWS, gemv_usable, launch_gemv
from aserve.distributed import current_group


# Decode steps of at most GEMV_MAX_ROWS tokens on a GPU run aserve's GEMV kernel instead of
# cuBLAS, which streamed some decode-step weights at about half the copy bandwidth
# (bench/RESULTS.md). bench/profile_step.py --no-gemv turns it off to compare.
USE_GEMV = True


def uses_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear(x, weight) runs aserve's GEMV (a decode step of a few tokens on a GPU)."""
    return USE_GEMV and x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS and x.is_cuda and gemv_usable(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight^T + bias, as torch.nn.functional.linear."""
    if uses_gemv(x, weight):
        return launch_gemv(x, weight, bias)   # a layer's bias shares its weight's dtype and device
    return F.linear(x, weight, bias)


def fused_linear(x: torch.Tensor, layer: nn.Module, *, residual: Optional[torch.Tensor] = None,
                 relu: bool = False, scaled: int = 0, scale: float = 1.0) -> Optional[torch.Tensor]:
    """layer(x) followed, in the GEMV's own kernel, by the ops a decode step applies to it next
    (launch_gemv: the first `scaled` outputs times `scale`, ReLU, + residual), bit for bit as
    the separate torch ops give them; each op folded is one kernel fewer in the step's chain.
    None where that cannot be: not a GEMV step, or a layer whose output goes through a
    collective (gathered, or reduced over ranks). The caller then runs the ops itself."""
    if not uses_gemv(x, layer.weight) or not _output_is_local(layer):
        return None
    return launch_gemv(x, layer.weight, layer.bias, residual=residual, relu=relu, scaled=scaled, scale=scale)


def _output_is_local(layer: nn.Module) -> bool:
    """Whether layer(x) is linear(x, weight, bias) on this rank alone, with no collective."""
    if isinstance(layer, RowParallelLinear):
        return layer.tp_size == 1
    if isinstance(layer, ColumnParallelLinear):
        return not layer.gather_output
    return isinstance(layer, ReplicatedLinear)


def divide(numerator: int, denominator: int, what: str = "a layer size") -> int:
    """numerator / denominator, which must divide exactly (a shard count must be whole)."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size {denominator}")
    return numerator // denominator


def _copy(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id=None) -> None:
    """Copy a whole, unsharded tensor (norms, replicated biases, position embeddings)."""
    _copy(param, loaded_weight)


class ColumnParallelLinear(nn.Module):
    """y = xA^T + b with A split along its output dimension over the ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 gather_output: bool = False):
        super().__init__()
        self.tp = current_group()
        self.tp_rank, self.tp_size = self.tp.rank, self.tp.world_size
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, self.tp_size,
                                                f"the output size of {type(self).__name__}")
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size_per_partition), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """Copy this rank's rows of the full [output_size, ...] checkpoint tensor."""
        size = param.shape[0]
        _copy(param, loaded_weight.narrow(0, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight, self.bias)
        return self.tp.all_gather(out) if self.gather_output else out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stored as one matrix (e.g. gate_up).

    Each rank's weight is the concatenation of its slice of every projection, so a rank's
    output splits into its shards of each projection in order.
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = True,
                 gather_output: bool = False):
        self.output_sizes = list(output_sizes)
        for size in self.output_sizes:  # each projection is split on its own
            divide(size, current_group().world_size, f"a projection of {type(self).__name__}")
        super().__init__(input_size, sum(self.output_sizes), bias, gather_output)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: Optional[int] = None) -> None:
        """Copy this rank's slice of projection `shard_id` (an index into output_sizes)."""
        if shard_id is None:  # a checkpoint that already stores the merged matrix
            parts = [loaded_weight.narrow(0, sum(self.output_sizes[:i]), s)
                     for i, s in enumerate(self.output_sizes)]
            for i, part in enumerate(parts):
                self.weight_loader(param, part, i)
            return
        shard = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        _copy(param.data.narrow(0, offset, shard), loaded_weight.narrow(0, self.tp_rank * shard, shard))


class QKVParallelLinear(ColumnParallelLinear):
    """The fused query/key/value projection, split by heads over the ranks.

    With fewer KV heads than ranks, KV heads are replicated so every rank keeps at least one.
    """

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: Optional[int] = None, bias: bool = True):
        tp_size = current_group().world_size
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp_size, "the number of attention heads")
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            if tp_size % total_num_kv_heads:
                raise ValueError(f"tensor_parallel_size {tp_size} is not a multiple of the number of "
                                 f"key/value heads ({total_num_kv_heads}), so they cannot be replicated "
                                 f"evenly over the ranks")
            self.num_kv_head_replicas = tp_size // total_num_kv_heads
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size, "the number of key/value heads")
            self.num_kv_head_replicas = 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_size
        super().__init__(hidden_size, output_size, bias, gather_output=False)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: Optional[str] = None) -> None:
        """Copy this rank's heads of the "q", "k" or "v" checkpoint tensor."""
        q_size = self.num_heads * self.head_size
        kv_size = self.num_kv_heads * self.head_size
        if shard_id is None:  # a checkpoint that already stores fused q/k/v (all heads)
            total_q = self.total_num_heads * self.head_size
            total_kv = self.total_num_kv_heads * self.head_size
            q, k, v = loaded_weight.split([total_q, total_kv, total_kv], dim=0)
            for sid, part in (("q", q), ("k", k), ("v", v)):
                self.weight_loader(param, part, sid)
            return
        if shard_id == "q":
            offset, size, rank = 0, q_size, self.tp_rank
        elif shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, rank = kv_size, self.tp_rank // self.num_kv_head_replicas
        else:
            raise ValueError(f"unknown qkv shard id {shard_id!r}")
        _copy(param.data.narrow(0, offset, size), loaded_weight.narrow(0, rank * size, size))


class RowParallelLinear(nn.Module):
    """y = xA^T + b with A split along its input dimension; partial outputs are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 input_is_parallel: bool = True):
        super().__init__()
        self.tp = current_group()
        self.tp_rank, self.tp_size = self.tp.rank, self.tp.world_size
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, self.tp_size,
                                               f"the input size of {type(self).__name__}")
        self.input_is_parallel = input_is_parallel
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            # Replicated, and added once after the reduce (not once per rank).
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """Copy this rank's columns of the full [output_size, input_size] checkpoint weight."""
        size = param.shape[1]
        _copy(param, loaded_weight.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel and self.tp_size > 1:
            x = x.chunk(self.tp_size, dim=-1)[self.tp_rank]
        if self.tp_size == 1:
            return linear(x, self.weight, self.bias)
        out = self.tp.all_reduce(linear(x, self.weight))
        return out + self.bias if self.bias is not None else out


class ReplicatedLinear(nn.Module):
    """An unsharded linear layer (e.g. OPT's project_in/project_out)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def load_named_weights(module: nn.Module, weights, stacked_params=(), rename=None, route=None) -> None:
    """Load HF-named checkpoint tensors into `module` through each parameter's weight_loader.

    stacked_params: (param_part, checkpoint_part, shard_id) triples such as
    (".qkv_proj.", ".q_proj.", "q"): a checkpoint name containing checkpoint_part loads shard
    shard_id of the parameter named with param_part instead. rename(name) maps a checkpoint
    name to a parameter name, or None to skip it (rotary buffers, attention masks). route(name),
    tried first, gives (parameter name, shard id) for names that no substring maps (one expert's
    matrix of a stacked experts parameter), else None. Unknown
    names and parameters left unloaded raise ValueError, so a wrong mapping never serves noise.
    """
    params = dict(module.named_parameters(remove_duplicate=False))
    loaded: set[int] = set()
    for name, tensor in weights:
        if rename is not None:
            name = rename(name)
            if name is None:
                continue
        shard_id = None
        routed = route(name) if route is not None else None
        if routed is not None:
            name, shard_id = routed
        else:
            for param_part, ckpt_part, sid in stacked_params:
                if ckpt_part in name:
                    name, shard_id = name.replace(ckpt_part, param_part), sid
                    break
        param = params.get(name)
        if param is None:
            raise ValueError(f"checkpoint weight {name!r} has no matching parameter in "
                             f"{type(module).__name__}")
        loader = getattr(param, "weight_loader", default_weight_loader)
        loader(param, tensor, shard_id)
        loaded.add(id(param))
    missing = [n for n, p in module.named_parameters() if id(p) not in loaded]
    if missing:
        raise ValueError(f"checkpoint lacks weights for {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
