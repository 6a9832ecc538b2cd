"""Tensor parallelism: the process group the layers use, and the processes behind it.

- group.py: TensorParallelGroup (rank, world size, collectives) and the group current while
  a model is built;
- (rank 0) workers.py starts and watches the other ranks; plan_channel.py sends them each step;
- (ranks 1..N-1) worker_proc.py is a worker's whole life; headless.py starts a node's ranks.
"""

from aserve.distributed.group import (SINGLE_RANK, TensorParallelGroup, building_with, current_group,
                                      make_process_groups)

__all__ = ["SINGLE_RANK", "TensorParallelGroup", "building_with", "current_group", "make_process_groups"]
