"""Grammar masks on the logits: each constrained row keeps only the tokens its matcher allows.

The masks are computed on the host (llguidance, in its own thread pool, all rows at once)
while the GPU still runs the step's forward: nothing here waits for the device. They go up
as one packed bitmask (32 tokens per int32) and are applied to all constrained rows in one
vectorised operation. Unconstrained rows are not touched.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

_executor = None   # llguidance's thread pool, made on first use


def masked_logits(logits: torch.Tensor, rows: Sequence[int], matchers: Sequence) -> torch.Tensor:
    """A copy of logits [N, V] in which row rows[i] keeps only what matchers[i] allows."""
    import llguidance
    import llguidance.numpy as lnp

    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    num_rows, vocab = len(rows), logits.shape[1]
    words = (vocab + 31) // 32
    # The first sample of an n > 1 request is drawn best_of times from one sequence's
    # matcher: each distinct matcher's mask is computed once (and a matcher may not be used
    # by two threads at once), then spread to its rows.
    distinct: dict[int, int] = {}
    unique, which = [], []
    for m in matchers:
        slot = distinct.setdefault(id(m), len(unique))
        if slot == len(unique):
            unique.append(m)
        which.append(slot)
    bitmask = torch.empty((len(unique), words), dtype=torch.int32, pin_memory=logits.is_cuda)
    lnp.fill_next_token_bitmask_par(_executor, [(m, i) for i, m in enumerate(unique)], bitmask.numpy())
    if len(unique) < num_rows:
        bitmask = bitmask[torch.tensor(which)]
    packed = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((packed.unsqueeze(-1) >> shifts) & 1).view(num_rows, words * 32)[:, :vocab].bool()
    index = torch.tensor(np.asarray(rows, dtype=np.int64)).to(logits.device, non_blocking=True)
    out = logits.clone()
    out.index_copy_(0, index, out.index_select(0, index).masked_fill_(~allowed, float("-inf")))
    return out
