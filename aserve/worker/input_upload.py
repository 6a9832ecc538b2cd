"""Step inputs to the device in one copy per dtype instead of one copy per tensor.

Each host-to-device copy from pageable memory costs tens of microseconds of host time, and a
step has half a dozen input tensors: on a GPU this was most of the engine's host time per
decode step at batch 1. A step's inputs arrive packed in one flat array per dtype
(StepArrays); each goes through a reused pinned buffer in one asynchronous copy, and the
device tensors are slices of that copy.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch


class InputUploader:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._staging: dict[torch.dtype, torch.Tensor] = {}
        # The last copy out of each staging buffer: it must finish before the buffer is refilled.
        self._copied: dict[torch.dtype, Optional[torch.cuda.Event]] = {}

    def upload(self, flat: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D array as a tensor of `dtype` on the device, in one transfer."""
        host = torch.from_numpy(np.ascontiguousarray(flat, dtype=_NUMPY[dtype]))
        if self.device.type != "cuda":
            return host
        n = host.numel()
        staging = self._staging.get(dtype)
        if staging is None or staging.numel() < n:
            staging = torch.empty(max(n, 4096, 2 * (staging.numel() if staging is not None else 0)),
                                  dtype=dtype, pin_memory=True)
            self._staging[dtype] = staging
        elif self._copied.get(dtype) is not None:
            self._copied[dtype].synchronize()
        staging[:n].copy_(host)
        device_tensor = staging[:n].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._copied[dtype] = event
        return device_tensor


_NUMPY = {torch.int64: np.int64, torch.int32: np.int32}
