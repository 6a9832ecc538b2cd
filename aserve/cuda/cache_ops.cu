// KV-cache maintenance: storing this step's keys and values at their slots, and copying whole
// blocks for copy-on-write. Both move raw 16-byte units, so one build serves every dtype
// (the caller checks that rows are multiples of 16 bytes and 16-byte aligned).
#include "common.cuh"

// Grid: one CTA per token. key/value rows are num_kv_heads * head_dim elements, unit_per_row
// 16-byte units, at key_stride / value_stride units apart (they may be views into a fused qkv
// tensor). A negative slot marks a padding token (CUDA-graph batches): nothing is written.
extern "C" __global__ void reshape_and_cache(const uint4* __restrict__ key, const uint4* __restrict__ value,
                                             uint4* __restrict__ k_cache, uint4* __restrict__ v_cache,
                                             const i64* __restrict__ slot_mapping,
                                             i64 key_stride, i64 value_stride, int units_per_row) {
    start_after_previous_kernel();
    const int token = blockIdx.x;
    const i64 slot = slot_mapping[token];
    if (slot < 0) return;
    const uint4* k = key + token * key_stride;
    const uint4* v = value + token * value_stride;
    uint4* kd = k_cache + slot * units_per_row;
    uint4* vd = v_cache + slot * units_per_row;
    for (int i = threadIdx.x; i < units_per_row; i += blockDim.x) {
        kd[i] = load_fresh(k + i);
        vd[i] = load_fresh(v + i);
    }
}

// Grid (num_pairs, num_layers, 2): copies block src -> dst of each layer's keys (z = 0) or
// values (z = 1). layer_caches[l] points at layer l's cache [2, num_blocks, block units].
extern "C" __global__ void copy_blocks(const i64* __restrict__ layer_caches, const i64* __restrict__ pairs,
                                       i64 num_blocks, i64 units_per_block) {
    const i64 src = pairs[2 * blockIdx.x], dst = pairs[2 * blockIdx.x + 1];
    uint4* cache = reinterpret_cast<uint4*>(layer_caches[blockIdx.y]) + blockIdx.z * num_blocks * units_per_block;
    const uint4* from = cache + src * units_per_block;
    uint4* to = cache + dst * units_per_block;
    for (i64 i = threadIdx.x; i < units_per_block; i += blockDim.x) to[i] = from[i];
}
