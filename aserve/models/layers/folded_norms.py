"""Residual adds and RMSNorms folded into the GEMVs of a small decode step (gemv.cu's NORM_INPUT
and ADD_TO_OUT variants).

A pre-norm decoder layer (Llama's) at a few tokens is a chain of weight-streaming GEMVs, with a
residual add and an RMSNorm kernel before the QKV and the gate/up projections. Folded, the O
and down projections add their output into the residual stream in their epilogue, and the QKV
and gate/up GEMVs normalize the stream into shared memory in their prologue: two kernels fewer
a layer, and the residual stream is one tensor updated in place. Only without tensor
parallelism: a row-parallel output must be all-reduced before it joins the stream.

Off unless ASERVE_FOLD_NORMS=1: these kernels are compiled and tested on the CPU machine's
NVRTC but have not yet run on a GPU (tests/test_cuda_gemv.py and tests/test_cuda_engine.py
check them there). The default turns on once they pass there and B1 is measured.
"""

from __future__ import annotations

import os

import torch

from aserve.cuda import fused
from aserve.cuda.gemv import GEMV_MAX_ROWS, gemv_add_, gemv_normed, gemv_usable, norm_fold_usable
from aserve.models.layers import linear as linear_module
from aserve.models.layers.layernorm import RMSNorm


FOLD_ENV = "ASERVE_FOLD_NORMS"


def can_fold(residual: torch.Tensor, normed_layers, added_layers) -> bool:
    """Whether a step whose residual stream is `residual` [T, hidden] can run the folded ops:
    `normed_layers` read the normalized stream, `added_layers` add into it."""
    if os.environ.get(FOLD_ENV, "0") != "1":
        return False
    if not (linear_module.USE_GEMV and residual.dim() == 2 and residual.shape[0] <= GEMV_MAX_ROWS
            and fused.usable(residual)):
        return False
    layers = list(normed_layers) + list(added_layers)
    if any(getattr(layer, "tp_size", 1) != 1 for layer in layers):
        return False
    if not all(norm_fold_usable(residual, layer.weight) for layer in normed_layers):
        return False
    rows = residual.shape[0]
    # The added layers' inputs (attention output, SiLU-and-mul output) are fresh contiguous
    # tensors of the stream's dtype: checked here through a stand-in of their shape.
    return all(gemv_usable(residual.new_empty(rows, layer.weight.shape[1]), layer.weight)
               and (layer.bias is None or layer.bias.dtype == residual.dtype)
               for layer in added_layers)


def normed_linear(residual: torch.Tensor, norm: RMSNorm, layer) -> torch.Tensor:
    """layer(norm(residual)), the norm in the GEMV's prologue."""
    return gemv_normed(residual, norm.weight, norm.variance_epsilon, layer.weight, layer.bias)


def add_linear_(residual: torch.Tensor, x: torch.Tensor, layer) -> None:
    """residual += layer(x), in the GEMV's epilogue."""
    gemv_add_(residual, x, layer.weight, layer.bias)
