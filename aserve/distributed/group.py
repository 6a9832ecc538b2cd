"""A rank's tensor-parallel group: where it stands, and the collectives the model layers use.

Layers take the group that is current while a model is built (`building_with(group)`) and
keep it, so one model file serves TP=1 and TP>1 and two engines in one process never share
parallel state. The group wraps torch.distributed process-group objects made directly from a
store (no default group, no module-level world), and at world size 1 every collective is the
identity and no torch.distributed object exists at all.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from typing import Iterator, Optional

import torch

logger = logging.getLogger(__name__)


class TensorParallelGroup:
    """This process's rank among world_size ranks that each hold a shard of one model.

    device_group carries the model's collectives (NCCL on GPUs, gloo on the CPU); cpu_group
    (gloo) carries small host-side agreements such as the KV block count.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device_group=None, cpu_group=None,
                 backend: str = "none") -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid tensor parallel rank {rank} for world size {world_size}")
        if world_size > 1 and (device_group is None or cpu_group is None):
            raise ValueError("a tensor-parallel group of several ranks needs its process groups")
        self.rank = rank
        self.world_size = world_size
        self.device_group = device_group
        self.cpu_group = cpu_group
        self.backend = backend

    @classmethod
    def layout_only(cls, rank: int, world_size: int) -> "TensorParallelGroup":
        """A rank's place with no connection, for building a model's shapes (meta device)."""
        group = cls()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid tensor parallel rank {rank} for world size {world_size}")
        group.rank, group.world_size = rank, world_size
        return group

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    @property
    def collectives_capturable(self) -> bool:
        """Whether CUDA graphs may capture this group's collectives (NCCL's; gloo's run on
        the host and cannot be captured)."""
        return not self.is_parallel or self.backend == "nccl"

    # ------------------------------------------------------------------ model collectives
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; returns x."""
        if self.world_size == 1:
            return x
        if self._staged(x):
            x.copy_(self.all_reduce(x.cpu()))
            return x
        self.device_group.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x concatenated along dim, in rank order."""
        if self.world_size == 1:
            return x
        if self._staged(x):
            return self.all_gather(x.cpu(), dim).to(x.device)
        x = x.contiguous()
        # Ranks' tensors one after another along dim 0 (the layout gloo and NCCL both take).
        gathered = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        self.device_group._allgather_base(gathered, x).wait()
        gathered = gathered.view(self.world_size, *x.shape)
        dim = dim % x.dim()
        # [world, ..., d, ...] -> [..., world * d, ...]
        return gathered.movedim(0, dim).reshape(*x.shape[:dim], -1, *x.shape[dim + 1:])

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """x from rank src on every rank, in place; returns x."""
        if self.world_size == 1:
            return x
        if self._staged(x):
            x.copy_(self.broadcast(x.cpu(), src))
            return x
        options = torch.distributed.BroadcastOptions()
        options.rootRank = src
        self.device_group.broadcast([x], options).wait()
        return x

    def _staged(self, x: torch.Tensor) -> bool:
        # Ranks sharing a GPU run gloo (NCCL refuses them): its collectives go through host
        # copies, which work for every collective and tensor type. A test and debug path.
        return self.backend == "gloo" and x.is_cuda

    # ------------------------------------------------------------------ host agreements
    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's value (e.g. the KV blocks every rank can hold)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        options = torch.distributed.AllreduceOptions()
        options.reduceOp = torch.distributed.ReduceOp.MIN
        self.cpu_group.allreduce([tensor], options).wait()
        return int(tensor.item())

    def all_ranks_agree(self, flag: bool) -> bool:
        """True only where every rank says True."""
        return bool(self.min_over_ranks(int(flag)))

    # ------------------------------------------------------------------ life cycle
    def abort(self) -> None:
        """Make collectives that wait on a dead rank fail instead of hanging (any thread)."""
        for group in {id(g): g for g in (self.device_group, self.cpu_group) if g is not None}.values():
            try:
                group.abort()
            except Exception as exc:  # aborting is best effort: the engine is failing anyway
                logger.debug("aborting a process group failed: %r", exc)

    def shutdown(self) -> None:
        for group in {id(g): g for g in (self.device_group, self.cpu_group) if g is not None}.values():
            try:
                group.shutdown()
            except Exception as exc:
                logger.debug("shutting a process group down failed: %r", exc)
        self.device_group = self.cpu_group = None


SINGLE_RANK = TensorParallelGroup()
_building: TensorParallelGroup = SINGLE_RANK


def current_group() -> TensorParallelGroup:
    """The group a layer under construction belongs to (one rank unless building_with says)."""
    return _building


@contextlib.contextmanager
def building_with(group: TensorParallelGroup) -> Iterator[TensorParallelGroup]:
    """Build a model's layers as shards of `group` (layers read it once, in __init__)."""
    global _building
    previous, _building = _building, group
    try:
        yield group
    finally:
        _building = previous


def make_process_groups(store, rank: int, world_size: int, device: torch.device,
                        timeout: datetime.timedelta, backend: Optional[str] = None) -> TensorParallelGroup:
    """Connect this rank to the others through `store` (every rank calls this at once).

    backend: "nccl" (GPUs) or "gloo"; None picks NCCL for CUDA devices and gloo otherwise.
    """
    import torch.distributed as dist

    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    cpu_group = dist.ProcessGroupGloo(dist.PrefixStore("aserve/cpu/", store), rank, world_size, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        device_group = dist.ProcessGroupNCCL(dist.PrefixStore("aserve/nccl/", store), rank, world_size, options)
    elif backend == "gloo":
        device_group = cpu_group if device.type == "cpu" else dist.ProcessGroupGloo(
            dist.PrefixStore("aserve/gloo/", store), rank, world_size, timeout)
    else:
        raise ValueError(f"unknown tensor-parallel backend {backend!r}; use nccl or gloo")
    group = TensorParallelGroup(rank, world_size, device_group, cpu_group, backend)
    # One collective now: NCCL builds its communicator here (never inside a graph capture),
    # and a rank that cannot reach the others fails at start-up, not at the first request.
    group.all_reduce(torch.ones(1, device=device))
    return group


class TensorParallelError(RuntimeError):
    """A collective failed or a rank died: the ranks are out of step, so the engine stops."""
