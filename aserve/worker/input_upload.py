"""A step's inputs to the device in one copy.

Each host-to-device copy costs host time (on the H200's host ~0.1 ms for the torch calls around
one), and a step has half a dozen input tensors of two dtypes. A step's inputs arrive packed in
one flat array per dtype (StepArrays); both are written with numpy into one reused pinned
buffer, int64 values first, and go over in one asynchronous copy; the device tensors are views
of that copy.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

# Staging buffers taken in turn: a buffer is refilled only once the copy out of it is done, and
# with two, that copy was queued a whole step earlier (async scheduling queues one step ahead),
# so the host does not wait for it.
_RING = 2


class InputUploader:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._staging: list[Optional[torch.Tensor]] = [None] * _RING    # pinned uint8
        self._staging_host: list[Optional[np.ndarray]] = [None] * _RING  # numpy views of them
        # The last copy out of each staging buffer: it must finish before the buffer is refilled.
        self._copied: list[Optional[torch.cuda.Event]] = [None] * _RING
        self._turn = 0

    def upload(self, int64: np.ndarray, int32: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The two 1-D arrays as int64 and int32 tensors on the device, in one transfer."""
        if self.device.type != "cuda":
            return (torch.from_numpy(np.ascontiguousarray(int64, dtype=np.int64)),
                    torch.from_numpy(np.ascontiguousarray(int32, dtype=np.int32)))
        head = 8 * len(int64)            # a multiple of 8: the int32 part's view is aligned
        total = head + 4 * len(int32)
        turn = self._turn
        self._turn = (turn + 1) % _RING
        staging = self._staging[turn]
        if staging is None or staging.numel() < total:
            # The old buffer is not reused while a copy reads it: torch's caching host
            # allocator holds a pinned block until the copies queued from it are done.
            staging = torch.empty(max(total, 1 << 16, 2 * (staging.numel() if staging is not None else 0)),
                                  dtype=torch.uint8, pin_memory=True)
            self._staging[turn], self._staging_host[turn] = staging, staging.numpy()
        elif self._copied[turn] is not None:
            self._copied[turn].synchronize()
        host = self._staging_host[turn]
        host[:head].view(np.int64)[:] = int64
        host[head:total].view(np.int32)[:] = int32
        copied = staging[:total].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._copied[turn] = event
        return copied[:head].view(torch.int64), copied[head:total].view(torch.int32)
