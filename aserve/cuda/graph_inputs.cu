// A decode step's inputs written into the static buffers of its captured CUDA graph in one
// launch (aserve/worker/cuda_graphs.py). Done with torch, that is five device-to-device copies
// and two fills for the padding rows: seven operations for the host to issue and seven gaps on
// the GPU before every replay, for a few kilobytes.
#include "common.cuh"

// Grid: one CTA per row of the graph's batch. Rows below n take the step's values; the rest
// are padding, which writes nothing (slot -1) and attends to nothing (seq_len 0). A row's block
// table is `width` entries of the step's (rows table_stride apart) into the graph's row of
// max_blocks; entries past width are left as they are (the kernel stops at its seq_len).
extern "C" __global__ void fill_graph_inputs(
    i64* __restrict__ input_ids, i64* __restrict__ positions, i64* __restrict__ slot_mapping,
    int* __restrict__ seq_lens, int* __restrict__ block_tables,
    const i64* __restrict__ step_input_ids, const i64* __restrict__ step_positions,
    const i64* __restrict__ step_slot_mapping, const int* __restrict__ step_seq_lens,
    const int* __restrict__ step_block_tables, i64 table_stride, int n, int width, int max_blocks) {
    const int row = blockIdx.x;
    if (row >= n) {
        if (threadIdx.x == 0) {
            slot_mapping[row] = -1;
            seq_lens[row] = 0;
        }
        return;
    }
    if (threadIdx.x == 0) {
        input_ids[row] = step_input_ids[row];
        positions[row] = step_positions[row];
        slot_mapping[row] = step_slot_mapping[row];
        seq_lens[row] = step_seq_lens[row];
    }
    const int* from = step_block_tables + row * table_stride;
    int* to = block_tables + (i64)row * max_blocks;
    for (int c = threadIdx.x; c < width; c += blockDim.x) to[c] = from[c];
}
