"""Tensor-parallel process groups: what a rank is, and the collectives the layers use.

- group.py: TensorParallelGroup (rank, world size, collectives) and the group current while
  a model is built;
- rendezvous.py: the head's store, each rank's device, and the process groups it connects.
The processes themselves are aserve/executor's.
"""

from aserve.distributed.group import (SINGLE_RANK, TensorParallelGroup, building_with, current_group,
                                      make_process_groups)

__all__ = ["SINGLE_RANK", "TensorParallelGroup", "building_with", "current_group", "make_process_groups"]
