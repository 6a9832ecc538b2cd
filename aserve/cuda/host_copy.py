"""Small host values (a step's index lists, temperatures, block copies) to the device without
waiting for the GPU.

A copy from pageable host memory waits for all the work queued before it on the stream. Under
async scheduling a step is launched while the previous one still runs on the GPU, so such a
copy in the middle of a launch makes the host sit out the previous step and leaves the GPU
idle while the rest of the launch is prepared. From pinned memory the copy just queues behind
that work (torch's caching host allocator keeps the pinned block until the copy is done).
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype) on `device`, queued without a wait on a GPU."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
