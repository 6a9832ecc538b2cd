"""CUDA graphs for decode steps: the model forward of a batch of one-token sequences, captured
once per batch size of a ladder and replayed, so a step costs one launch instead of hundreds.

A graph reads its inputs from static buffers; a replay copies the step's inputs into them and
pads the batch up to the captured size with rows that write nothing (slot -1) and attend to
nothing (seq_len 0): with torch's copies, or in one kernel (ASERVE_GRAPH_INPUTS_KERNEL=1,
aserve/cuda/graph_inputs.py). The decode kernel's grid is fixed at capture by
max_seq_len_to_capture (its number of context splits); a step with a longer context, or a
larger batch, runs eagerly.

Only the first (largest) size runs eagerly before its capture (ASERVE_GRAPH_WARMUP=needed, the
default): that run compiles, loads and sets up every kernel a step launches. A later capture that
still reaches a kernel's one-time set-up (a size whose launch plan differs) is refused
(SetUpDuringCapture), dropped, and taken again after an eager run of its own; under tensor
parallelism every rank takes that size again, since the eager run's collectives need them all.
ASERVE_GRAPH_WARMUP=each runs every size eagerly before its capture, as before: those runs were
1.7-2.9 s of model B's 51 sizes on an H200, whose start fell from 5.8-6.6 s to 3.7-4.1 s with
`needed` (bench/RESULTS.md, 2026-12-04, seventeenth session).
"""

from __future__ import annotations

import gc
import logging
import os
import time

import torch

from aserve.attention import AttentionMetadata
from aserve.cuda.compiler import SetUpDuringCapture
from aserve.cuda.graph_inputs import fill_graph_inputs, graph_inputs_kernel_enabled
from aserve.distributed import SINGLE_RANK, TensorParallelGroup

logger = logging.getLogger(__name__)


GRAPH_WARMUP_ENV = "ASERVE_GRAPH_WARMUP"


def graph_warmup_policy() -> str:
    """ASERVE_GRAPH_WARMUP, checked: needed (the default: an eager run where a capture needs
    one) or each (an eager run before every capture)."""
    policy = os.environ.get(GRAPH_WARMUP_ENV, "needed")
    if policy not in ("each", "needed"):
        raise ValueError(f"{GRAPH_WARMUP_ENV} must be each or needed, got {policy!r}")
    return policy


# Batches larger than this run eagerly: their steps are long enough on the GPU for the
# host's launches to keep ahead of it, and each captured size adds to the engine's start.
MAX_GRAPH_BATCH = 512


def batch_size_ladder(max_num_seqs: int) -> list[int]:
    """vLLM's ladder: 1, 2, 4, every multiple of 8 to 256, every multiple of 16 to 512; ending
    at max_num_seqs where that is smaller."""
    largest = min(max_num_seqs, MAX_GRAPH_BATCH)
    sizes = [b for b in (1, 2, 4) if b <= largest]
    sizes += list(range(8, min(largest, 256) + 1, 8)) + list(range(272, largest + 1, 16))
    if sizes[-1] != largest:
        sizes.append(largest)
    return sizes


def capture_in_turn(sizes, try_capture, retake, all_ranks_agree, warm_each: bool) -> None:
    """Capture each size in turn: the first one, and every one under warm_each, by retake
    (an eager warm-up, then the capture); any other by try_capture first, retaken where it was
    refused. Tensor-parallel ranks retake a size together (all_ranks_agree): the warm-up's
    collectives run eagerly, so a capture refused on one rank is taken again on every rank."""
    first = True
    for batch in sizes:
        captured = not warm_each and not first and try_capture(batch)
        if not all_ranks_agree(captured):
            retake(batch)
        first = False


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, max_num_seqs: int,
                 max_seq_len_to_capture: int, device: torch.device,
                 group: TensorParallelGroup = SINGLE_RANK) -> None:
        self.model = model
        self.group = group
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_seq_len = max_seq_len_to_capture
        self.max_blocks = -(-max_seq_len_to_capture // block_size)
        self.sizes = batch_size_ladder(max_num_seqs)
        largest = self.sizes[-1]
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(largest, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(largest, self.max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.warmup_seconds = 0.0   # of capture_seconds: the eager runs before captures
        self.num_warmups = 0
        self.num_replays = 0

    def _metadata(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_tokens=batch, query_start_loc=self.query_start_loc[:batch + 1],
            seq_lens=self.seq_lens[:batch], block_tables=self.block_tables[:batch],
            slot_mapping=self.slot_mapping[:batch], max_query_len=1, max_seq_len=self.max_seq_len,
            # Only the torch reference reads these; the graphs run the CUDA decode kernel.
            query_lens_cpu=[1] * batch, seq_lens_cpu=[self.max_seq_len] * batch)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first so the smaller graphs reuse its memory."""
        warm_each = graph_warmup_policy() == "each"
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        # A garbage collection inside a capture may destroy an unreferenced CUDA graph of an
        # earlier engine in this process, and freeing one is not permitted while capturing
        # (it invalidates the capture: seen as a cuBLAS failure in a GPU test). Collect first,
        # then keep the collector off until the captures are done.
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            capture_in_turn(reversed(self.sizes), lambda batch: self._capture(batch, pool),
                            lambda batch: self._retake(batch, pool), self.group.all_ranks_agree, warm_each)
        finally:
            if was_enabled:
                gc.enable()
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start

    def _args(self, batch: int) -> tuple:
        return self.input_ids[:batch], self.positions[:batch], self.kv_caches, self._metadata(batch)

    def _retake(self, batch: int, pool) -> None:
        """Drop what a capture of `batch` kept, run the step eagerly, capture it again."""
        self.graphs.pop(batch, None)
        self.outputs.pop(batch, None)
        self._warm_up(batch)
        self._capture(batch, pool, retry=False)

    def _warm_up(self, batch: int) -> None:
        """One eager run: compiles, loads and sets up every kernel the step launches (and
        torch's own lazy set-up, cuBLAS's among it) outside any capture."""
        started = time.perf_counter()
        self.model(*self._args(batch))
        torch.cuda.synchronize()
        self.warmup_seconds += time.perf_counter() - started
        self.num_warmups += 1

    def _capture(self, batch: int, pool, retry: bool = True) -> bool:
        """Capture the step of `batch` rows on torch's side stream; False (nothing kept) where
        retry allows and the step reached a kernel's one-time set-up, refused in a capture."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool):
                output = self.model(*self._args(batch))
        except SetUpDuringCapture:
            if not retry:
                raise
            return False   # the partial graph and its output are dropped here
        self.graphs[batch], self.outputs[batch] = graph, output
        return True

    def can_run(self, metadata: AttentionMetadata) -> bool:
        return (metadata.is_all_decode and metadata.num_tokens <= self.sizes[-1]
                and metadata.max_seq_len <= self.max_seq_len
                and metadata.block_tables.shape[1] <= self.max_blocks)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            metadata: AttentionMetadata) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode step that can_run() accepted."""
        n = metadata.num_tokens
        batch = next(b for b in self.sizes if b >= n)
        if graph_inputs_kernel_enabled():   # one launch for what follows
            fill_graph_inputs((self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.block_tables),
                              batch, input_ids, positions, metadata.slot_mapping, metadata.seq_lens,
                              metadata.block_tables)
        else:
            self._copy_inputs(n, batch, input_ids, positions, metadata)
        self.graphs[batch].replay()
        self.num_replays += 1
        return self.outputs[batch][:n]

    def _copy_inputs(self, n: int, batch: int, input_ids: torch.Tensor, positions: torch.Tensor,
                     metadata: AttentionMetadata) -> None:
        width = metadata.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(metadata.slot_mapping)
        self.seq_lens[:n].copy_(metadata.seq_lens)
        # Table entries past a row's width are never read: the kernel stops at its seq_len.
        self.block_tables[:n, :width].copy_(metadata.block_tables)
        if batch > n:
            self.slot_mapping[n:batch].fill_(-1)
            self.seq_lens[n:batch].zero_()
