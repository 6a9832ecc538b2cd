"""Launcher of graph_inputs.cu: a decode step's inputs into its CUDA graph's static buffers in
one kernel, instead of five torch copies and two fills (aserve/worker/cuda_graphs.py)."""

from __future__ import annotations

import torch

from aserve.cuda.compiler import INT, INT64, POINTER, current_stream, device_index, env_switch, load_module
from aserve.cuda.fused import kernels_enabled

# 1: DecodeGraphs.run fills its buffers with fill_graph_inputs; 0 (the default): with torch's
# copies. On the H200 its card test passed but B1 did not move (0 / 1 / 0 / 1: 4.185 / 4.187 /
# 4.172 / 4.208 ms/token; bench/RESULTS.md, 2026-12-04).
GRAPH_INPUTS_KERNEL_ENV = "ASERVE_GRAPH_INPUTS_KERNEL"
_THREADS = 128


def graph_inputs_kernel_enabled() -> bool:
    """Whether to use fill_graph_inputs: asked for, and aserve's kernels can run."""
    return env_switch(GRAPH_INPUTS_KERNEL_ENV, "0") and kernels_enabled()


def fill_graph_inputs(buffers: tuple[torch.Tensor, ...], batch: int, input_ids: torch.Tensor,
                      positions: torch.Tensor, slot_mapping: torch.Tensor, seq_lens: torch.Tensor,
                      block_tables: torch.Tensor) -> None:
    """The first `batch` rows of the graph's buffers (input_ids, positions, slot_mapping int64
    [B]; seq_lens int32 [B]; block_tables int32 [B, max_blocks], all contiguous) from a step of
    n <= batch rows: the step's values in rows below n, padding (slot -1, seq_len 0) above,
    each row's first block_tables.shape[1] table entries. The step's tensors: int64/int32 of
    n rows, each dense (block_tables' rows may be strided)."""
    graph_ids, graph_positions, graph_slots, graph_seq_lens, graph_tables = buffers
    n, width = block_tables.shape
    max_blocks = graph_tables.shape[1]
    assert n <= batch <= graph_ids.numel() and width <= max_blocks and block_tables.stride(1) == 1
    assert input_ids.dtype == positions.dtype == slot_mapping.dtype == torch.int64
    assert seq_lens.dtype == block_tables.dtype == torch.int32
    assert all(t.is_contiguous() for t in (input_ids, positions, slot_mapping, seq_lens, *buffers))
    load_module("graph_inputs.cu", [], device_index(graph_ids)).kernel("fill_graph_inputs").launch(
        (batch, 1, 1), (_THREADS, 1, 1), 0,
        (graph_ids.data_ptr(), graph_positions.data_ptr(), graph_slots.data_ptr(), graph_seq_lens.data_ptr(),
         graph_tables.data_ptr(), input_ids.data_ptr(), positions.data_ptr(), slot_mapping.data_ptr(),
         seq_lens.data_ptr(), block_tables.data_ptr(), block_tables.stride(0), n, width, max_blocks),
        (POINTER,) * 10 + (INT64, INT, INT, INT), current_stream(graph_ids))
