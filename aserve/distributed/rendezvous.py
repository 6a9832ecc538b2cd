"""How the ranks find each other: the head's TCPStore, each rank's device, the process groups.

The head (node 0) serves a torch.distributed TCPStore; every other rank connects to it as a
client (torchrun's rendezvous, without torchrun). Through the store every rank builds:
- the tensor-parallel group (NCCL between GPUs, gloo on the CPU) and a gloo group for host
  agreements (group.py);
- with several nodes, a gloo "plan" group of rank 0 and the ranks of the other nodes, over
  which rank 0 broadcasts each step (the head node's ranks read it from shared memory).
"""

from __future__ import annotations

import datetime
import os
import torch

from aserve.config import ParallelConfig
from aserve.distributed.group import TensorParallelGroup, make_process_groups

# NVLink multicast (NVLS) must stay off on the shared GPU machines this project runs on: a
# program that uses it can put a host's GPUs out of service. Set for this process and, being
# in os.environ before any worker starts, for every worker it spawns.
SAFE_COLLECTIVES_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                        "NVSHMEM_DISABLE_NVLS": "1"}
# Overrides the tensor-parallel backend: "gloo" lets several ranks share one GPU (NCCL refuses
# that), e.g. to run the worker machinery on a one-GPU machine; CUDA graphs are then off.
BACKEND_ENV = "ASERVE_TP_BACKEND"
# Collectives wait this long for a slow rank (a rank still loading its weights) before failing;
# a rank that dies is noticed at once by other means (executor/worker_group.py).
TIMEOUT_ENV = "ASERVE_DIST_TIMEOUT_S"
_DEFAULT_TIMEOUT_S = 1800
# Remote ranks wait for the next step inside a broadcast: an idle server must not time out.
_IDLE_TIMEOUT = datetime.timedelta(days=365)


def use_safe_collectives_env() -> None:
    for name, value in SAFE_COLLECTIVES_ENV.items():
        os.environ.setdefault(name, value)


def dist_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, _DEFAULT_TIMEOUT_S)))


def backend_for(device: torch.device) -> str:
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"{BACKEND_ENV} must be nccl or gloo, got {backend!r}.")
    return backend


def rank_device(parallel: ParallelConfig, rank: int, device_type: str) -> torch.device:
    """Rank r's device: its node's GPU number r % ranks_per_node (of CUDA_VISIBLE_DEVICES), or
    the CPU. Raises ValueError when the node has fewer GPUs than ranks (unless gloo lets
    ranks share GPUs)."""
    if device_type != "cuda":
        return torch.device("cpu")
    local, count = parallel.local_rank(rank), torch.cuda.device_count()
    if parallel.ranks_per_node > count:
        if backend_for(torch.device("cuda")) != "gloo":
            raise ValueError(f"tensor_parallel_size {parallel.tensor_parallel_size} over {parallel.nnodes} "
                             f"node(s) needs {parallel.ranks_per_node} GPUs on each node; this one has "
                             f"{count} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}).")
        local %= count
    return torch.device("cuda", local)


def head_address(parallel: ParallelConfig) -> tuple[str, int]:
    """Where the head's store listens: master_addr:master_port, or on one node by default
    loopback and port 0 (a free port, which the head then passes to its workers)."""
    return parallel.master_addr or "127.0.0.1", parallel.master_port or 0


def open_store(host: str, port: int, is_head: bool):
    """The head's store (serving), or a client of it, which waits up to the distributed
    timeout for the head to appear."""
    import torch.distributed as dist

    return dist.TCPStore(host, port, None, is_head, timeout=dist_timeout(), wait_for_workers=False)


def connect(parallel: ParallelConfig, rank: int, store, device: torch.device):
    """(this rank's TensorParallelGroup, its plan group or None). Every rank calls this at once."""
    import torch.distributed as dist

    group: TensorParallelGroup = make_process_groups(
        store, rank, parallel.world_size, device, dist_timeout(), backend_for(device))
    plan_group = None
    remote = [r for r in range(parallel.world_size) if r not in parallel.node_ranks(0)]
    members = [0] + remote
    if remote and rank in members:
        plan_group = dist.ProcessGroupGloo(dist.PrefixStore("aserve/plan/", store),
                                           members.index(rank), len(members), _IDLE_TIMEOUT)
    return group, plan_group
