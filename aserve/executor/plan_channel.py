"""Each step's message from rank 0 to the other ranks (worker/step_arrays.py says what is in it).

On the head node the message goes through a shared-memory ring (a copy of the bytes, a few
microseconds); to ranks on other nodes it goes as a gloo broadcast of its length and then its
bytes. Nothing is pickled: a message is the step's packed arrays, whatever the requests.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from aserve.executor.shm_ring import ShmRing


def _broadcast(group, tensor: torch.Tensor) -> None:
    options = torch.distributed.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


class PlanSender:
    """Rank 0's end. check() raises when a reader died, so a full ring never blocks forever."""

    def __init__(self, ring: Optional[ShmRing], remote_group=None,
                 check: Optional[Callable[[], None]] = None) -> None:
        self.ring = ring
        self.remote_group = remote_group
        self.check = check

    def send(self, parts: Sequence[memoryview]) -> None:
        if self.ring is not None:
            self.ring.write(parts, self.check)
        if self.remote_group is not None:
            payload = np.concatenate([np.frombuffer(p, dtype=np.uint8) for p in parts])
            _broadcast(self.remote_group, torch.tensor([payload.nbytes], dtype=torch.int64))
            _broadcast(self.remote_group, torch.from_numpy(payload))


class PlanReceiver:
    """A worker's end: the head node's ring, or the plan group's broadcast on other nodes."""

    def __init__(self, ring: Optional[ShmRing] = None, remote_group=None,
                 check: Optional[Callable[[], None]] = None) -> None:
        assert (ring is None) != (remote_group is None), "a worker reads exactly one channel"
        self.ring = ring
        self.remote_group = remote_group
        self.check = check

    def receive(self) -> np.ndarray:
        """The next message (uint8)."""
        if self.ring is not None:
            return self.ring.read(self.check)
        size = torch.zeros(1, dtype=torch.int64)
        _broadcast(self.remote_group, size)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        _broadcast(self.remote_group, payload)
        return payload.numpy()
