// Paged attention for decode: one query token per sequence over its context in the paged KV
// cache [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM] (keys and values apart).
//
// One thread block (CTA) takes one KV head, GROUP of the query heads that share it, one
// sequence and one partition of its context, so each key and value is read once for all the
// query heads of its group (grouped-query attention costs no extra bytes).
//
// Keys and values stream through shared memory in tiles of TILE tokens with cp.async, STAGES
// tiles in flight: the copies of the next tiles run while the warps compute on this one, and
// in-flight bytes take no registers. (A version that loaded into registers and then computed
// reached 81% of the copy bandwidth on an H100 at batch 64 x 2048 tokens, this one 89%;
// bench/RESULTS.md.) Each token slot of a warp keeps an online softmax (running max, sum and
// weighted values) over the tokens it visits; slots and warps are merged at the end.
//
// Long contexts are split over several CTAs (grid.z) so that even one sequence fills the GPU.
// Each split writes an unnormalised partial output with its max and exp-sum; the split that
// finishes last (an atomic counter per sequence and head group) combines them, so no second
// kernel is launched. A sequence with one split writes its output directly.
//
// Each sequence divides its own visible context into at most grid.z partitions of whole units
// (`unit` tokens, a multiple of BLOCK_SIZE), so the split follows the sequence's real length,
// not the longest length the launch allows: a CUDA graph captured for 8k tokens then gives a
// 640-token sequence as many splits as an eager launch would, and a big batch (grid.z 1) runs
// one CTA per sequence and head group with no CTAs left idle. Splits past a sequence's
// partitions exit at once.
//
// Compile-time configuration (-D, set by aserve/cuda/ops.py): DTYPE, HEAD_DIM, BLOCK_SIZE, GROUP,
// MAX_PARTITION (the most tokens one CTA covers: the launcher chooses grid.z so that no
// partition is longer).
#include "common.cuh"

#ifndef NUM_THREADS
#define NUM_THREADS 128
#endif
#define NUM_WARPS (NUM_THREADS / 32)

#define CHUNKS (HEAD_DIM / VEC)                    // 16-byte vectors in one head row
// Lanes that share one token row: the power of two covering the row's vectors, at most a warp.
#define LANES (CHUNKS >= 32 ? 32 : CHUNKS > 8 ? 16 : CHUNKS > 4 ? 8 : CHUNKS > 2 ? 4 : CHUNKS > 1 ? 2 : 1)
#define CPL ((CHUNKS + LANES - 1) / LANES)         // vectors per lane
#define TPW (32 / LANES)                           // tokens a warp covers at once
#define TOKENS_PER_PASS (NUM_WARPS * TPW)
#ifndef SMEM_BUDGET
#define SMEM_BUDGET (32 * 1024)                    // bytes of key and value stages per CTA
#endif
// Tokens per slot in one tile: fewer for big query-head groups, whose registers would
// otherwise spill, and few enough that two stages fit SMEM_BUDGET.
#define UNROLL_FIT (SMEM_BUDGET / (2 * 2 * TOKENS_PER_PASS * CHUNKS * 16))
#ifndef UNROLL
#define UNROLL_WANTED (GROUP > 4 ? 2 : 4)
#define UNROLL (UNROLL_FIT < UNROLL_WANTED ? UNROLL_FIT : UNROLL_WANTED)
#endif
#define TILE (TOKENS_PER_PASS * UNROLL)            // tokens per shared-memory stage
#define TILE_VECS (TILE * CHUNKS)                  // 16-byte vectors of one tile's keys (or values)
// As many stages as fit SMEM_BUDGET, at most MAX_STAGES, at least 2.
#ifndef MAX_STAGES
#define MAX_STAGES 4
#endif
#define STAGES_FIT (SMEM_BUDGET / (2 * TILE_VECS * 16))
#define STAGES (STAGES_FIT >= MAX_STAGES ? MAX_STAGES : STAGES_FIT >= 2 ? STAGES_FIT : 2)
static_assert(UNROLL >= 1 && 2 * STAGES * TILE_VECS * 16 <= SMEM_BUDGET, "stages exceed SMEM_BUDGET");
// The warps' merge buffer reuses the stage buffers once the last tile is consumed.
#define MERGE_VECS ((NUM_WARPS * GROUP * HEAD_DIM + 3) / 4)
#define STAGE_AREA_VECS (2 * STAGES * TILE_VECS)
#define SMEM_VECS (STAGE_AREA_VECS > MERGE_VECS ? STAGE_AREA_VECS : MERGE_VECS)

#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// 16 bytes global -> shared without passing through registers; src_bytes 0 fills zeros (a
// token past the partition's end).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
    const unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// CTAs per SM the register allocation must allow: 4 (at most 128 registers) measured 3-6%
// faster than the compiler's free choice for groups of 4 (bench/RESULTS.md); big groups need
// their registers.
#ifndef MIN_BLOCKS
#define MIN_BLOCKS (GROUP > 4 ? 1 : 4)
#endif

extern "C" __global__ void __launch_bounds__(NUM_THREADS, MIN_BLOCKS)
paged_decode(scalar_t* __restrict__ out,              // [num_seqs, num_heads, HEAD_DIM] rows of out_stride
             float* __restrict__ partial_out,         // [num_seqs, num_heads, max_splits, HEAD_DIM]
             float* __restrict__ partial_max,         // [num_seqs, num_heads, max_splits]
             float* __restrict__ partial_sum,         // [num_seqs, num_heads, max_splits]
             int* __restrict__ split_counters,        // [num_seqs * gridDim.x], zero between launches
             const scalar_t* __restrict__ query,      // [num_seqs, num_heads, HEAD_DIM] rows of q_stride
             const scalar_t* __restrict__ k_cache,
             const scalar_t* __restrict__ v_cache,
             const int* __restrict__ block_tables,    // [num_seqs, bt_stride]
             const int* __restrict__ seq_lens,        // [num_seqs]; 0 marks a padding row
             i64 q_stride, i64 out_stride, int bt_stride,
             int num_heads, int num_kv_heads, float scale, int max_splits, int unit,
             int sliding_window) {
    __shared__ int blocks[MAX_PARTITION / BLOCK_SIZE];
    __shared__ float warp_max_s[NUM_WARPS][GROUP], warp_sum_s[NUM_WARPS][GROUP];
    __shared__ uint4 smem[SMEM_VECS];
    __shared__ bool is_last_split;
    uint4* k_tiles = smem;                            // [STAGES][TILE][CHUNKS]
    uint4* v_tiles = smem + STAGES * TILE_VECS;       // [STAGES][TILE][CHUNKS]
    start_after_previous_kernel();

    const int q_per_kv = num_heads / num_kv_heads;
    const int groups_per_kv = q_per_kv / GROUP;
    const int kvh = blockIdx.x / groups_per_kv;
    const int head0 = kvh * q_per_kv + (blockIdx.x % groups_per_kv) * GROUP;
    const int seq = blockIdx.y;
    const int split = blockIdx.z;
    const int seq_len = seq_lens[seq];
    if (seq_len <= 0) return;                        // a padding row
    // Keys before the sliding window are invisible to the (last) query: the partitions cover
    // the visible range only, from the unit that holds its first key.
    const int first_visible = sliding_window > 0 ? max(0, seq_len - sliding_window) : 0;
    const int range_start = first_visible / unit * unit;
    const int span = seq_len - range_start;
    const int partition = ((span + gridDim.z - 1) / gridDim.z + unit - 1) / unit * unit;
    const int num_splits = (span + partition - 1) / partition;
    if (split >= num_splits) return;
    const int part_start = range_start + split * partition;
    const int part_end = min(part_start + partition, seq_len);
    const int t_begin = max(part_start, first_visible);
    const int num_tiles = t_begin < part_end ? (part_end - t_begin + TILE - 1) / TILE : 0;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int sub = lane / LANES;                    // which of the warp's TPW tokens
    const int lane_in_row = lane % LANES;

    // The partition's block ids, once, so no copy waits on a block-table load.
    const int* table = block_tables + (i64)seq * bt_stride + part_start / BLOCK_SIZE;
    for (int i = threadIdx.x; i * BLOCK_SIZE < part_end - part_start; i += NUM_THREADS) blocks[i] = table[i];

    // This lane's slice of the GROUP query vectors, pre-scaled by scale * log2(e) (exp2 below).
    float q[GROUP][CPL][VEC];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
            const int chunk = lane_in_row + c * LANES;
            if (chunk < CHUNKS) {
                unpack_vec(load_fresh(reinterpret_cast<const uint4*>(
                    query + seq * q_stride + (i64)(head0 + g) * HEAD_DIM + chunk * VEC)), q[g][c]);
#pragma unroll
                for (int i = 0; i < VEC; ++i) q[g][c][i] *= scale * 1.44269504f;
            } else {
#pragma unroll
                for (int i = 0; i < VEC; ++i) q[g][c][i] = 0.f;
            }
        }
    }
    __syncthreads();

    // Copies tile `tile` (tokens from t_begin + tile * TILE) into stage `stage`; tokens past
    // the partition come as zeros and are masked out of the softmax.
    auto load_tile = [&](int tile, int stage) {
        const int tile_start = t_begin + tile * TILE;
#pragma unroll
        for (int i = 0; i < (TILE_VECS + NUM_THREADS - 1) / NUM_THREADS; ++i) {
            const int v = threadIdx.x + i * NUM_THREADS;
            if (TILE_VECS % NUM_THREADS != 0 && v >= TILE_VECS) break;
            const int token = v / CHUNKS, chunk = v % CHUNKS;
            const int t = tile_start + token;
            const bool valid = t < part_end;
            const int local = valid ? t - part_start : 0;
            const i64 row = ((i64)blocks[local / BLOCK_SIZE] * BLOCK_SIZE + local % BLOCK_SIZE) * num_kv_heads + kvh;
            const i64 offset = row * HEAD_DIM + chunk * VEC;
            cp_async16(k_tiles + stage * TILE_VECS + v, k_cache + offset, valid ? 16 : 0);
            cp_async16(v_tiles + stage * TILE_VECS + v, v_cache + offset, valid ? 16 : 0);
        }
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < num_tiles) load_tile(s, s);
        cp_async_commit();                            // empty groups keep the wait counts uniform
    }

    // Online softmax: each token slot (LANES lanes) keeps its own running max, sum and
    // weighted values over the tokens it visits; slots and warps are merged at the end.
    float m[GROUP], l[GROUP], acc[GROUP][CPL][VEC];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        m[g] = NEG_INF;
        l[g] = 0.f;
#pragma unroll
        for (int c = 0; c < CPL; ++c)
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[g][c][i] = 0.f;
    }
    for (int tile = 0; tile < num_tiles; ++tile) {
        cp_async_wait<STAGES - 2>();                 // this thread's copies of `tile` landed
        __syncthreads();                              // everyone's did; the oldest stage is free
        if (tile + STAGES - 1 < num_tiles) load_tile(tile + STAGES - 1, (tile + STAGES - 1) % STAGES);
        cp_async_commit();
        const uint4* k_tile = k_tiles + (tile % STAGES) * TILE_VECS;
        const uint4* v_tile = v_tiles + (tile % STAGES) * TILE_VECS;
        const int tile_start = t_begin + tile * TILE;

        float s[UNROLL][GROUP];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int token = u * TOKENS_PER_PASS + warp * TPW + sub;
            float k[CPL][VEC];
#pragma unroll
            for (int c = 0; c < CPL; ++c) {
                const int chunk = lane_in_row + c * LANES;
                if (chunk < CHUNKS) unpack_vec(k_tile[token * CHUNKS + chunk], k[c]);
                else
#pragma unroll
                    for (int i = 0; i < VEC; ++i) k[c][i] = 0.f;
            }
            const bool valid = tile_start + token < part_end;
#pragma unroll
            for (int g = 0; g < GROUP; ++g) {
                float dot = 0.f;
#pragma unroll
                for (int c = 0; c < CPL; ++c)
#pragma unroll
                    for (int i = 0; i < VEC; ++i) dot += q[g][c][i] * k[c][i];
#pragma unroll
                for (int o = LANES / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
                s[u][g] = valid ? dot : NEG_INF;
            }
        }
        uint4 v_raw[UNROLL][CPL];                     // unpacked per use: fewer registers
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int token = u * TOKENS_PER_PASS + warp * TPW + sub;
#pragma unroll
            for (int c = 0; c < CPL; ++c) {
                const int chunk = lane_in_row + c * LANES;
                v_raw[u][c] = chunk < CHUNKS ? v_tile[token * CHUNKS + chunk] : make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            float m_new = m[g];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) m_new = fmaxf(m_new, s[u][g]);
            if (m_new == NEG_INF) continue;           // no visible token in this slot yet
            const float alpha = exp2f(m[g] - m_new);  // 0 while m[g] is still -inf
            m[g] = m_new;
            l[g] *= alpha;
#pragma unroll
            for (int c = 0; c < CPL; ++c)
#pragma unroll
                for (int i = 0; i < VEC; ++i) acc[g][c][i] *= alpha;
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const float p = exp2f(s[u][g] - m_new);
                l[g] += p;
#pragma unroll
                for (int c = 0; c < CPL; ++c) {
                    float v[VEC];
                    unpack_vec(v_raw[u][c], v);
#pragma unroll
                    for (int i = 0; i < VEC; ++i) acc[g][c][i] += p * v[i];
                }
            }
        }
    }
    // Merge the token slots of a warp (lanes holding the same vectors) ...
#pragma unroll
    for (int o = LANES; o < 32; o <<= 1) {
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            const float m_other = __shfl_xor_sync(0xffffffffu, m[g], o);
            const float l_other = __shfl_xor_sync(0xffffffffu, l[g], o);
            const float m_new = fmaxf(m[g], m_other);
            const float a = m[g] == NEG_INF ? 0.f : exp2f(m[g] - m_new);
            const float b = m_other == NEG_INF ? 0.f : exp2f(m_other - m_new);
            m[g] = m_new;
            l[g] = a * l[g] + b * l_other;
#pragma unroll
            for (int c = 0; c < CPL; ++c)
#pragma unroll
                for (int i = 0; i < VEC; ++i)
                    acc[g][c][i] = a * acc[g][c][i] + b * __shfl_xor_sync(0xffffffffu, acc[g][c][i], o);
        }
    }
    // ... then the warps, through shared memory (the stage buffers, now that every copy has
    // landed and every warp is past its last tile).
    cp_async_wait<0>();
    __syncthreads();
    float* warp_acc = reinterpret_cast<float*>(smem);  // [NUM_WARPS][GROUP][HEAD_DIM]
    if (sub == 0) {
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            if (lane == 0) { warp_max_s[warp][g] = m[g]; warp_sum_s[warp][g] = l[g]; }
#pragma unroll
            for (int c = 0; c < CPL; ++c) {
                const int chunk = lane_in_row + c * LANES;
                if (chunk < CHUNKS) {
#pragma unroll
                    for (int i = 0; i < VEC; ++i) warp_acc[(warp * GROUP + g) * HEAD_DIM + chunk * VEC + i] = acc[g][c][i];
                }
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < GROUP * HEAD_DIM; idx += NUM_THREADS) {
        const int g = idx / HEAD_DIM, d = idx % HEAD_DIM;
        float m_all = NEG_INF;
#pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w) m_all = fmaxf(m_all, warp_max_s[w][g]);
        float total = 0.f, sum = 0.f;
#pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w) {
            const float mw = warp_max_s[w][g];
            const float a = mw == NEG_INF ? 0.f : exp2f(mw - m_all);
            total += a * warp_acc[(w * GROUP + g) * HEAD_DIM + d];
            sum += a * warp_sum_s[w][g];
        }
        const int head = head0 + g;
        if (num_splits == 1) {
            out[seq * out_stride + (i64)head * HEAD_DIM + d] = from_float(total / sum);
        } else {
            const i64 slot = ((i64)seq * num_heads + head) * max_splits + split;
            partial_out[slot * HEAD_DIM + d] = total;
            // The split's max stays in log2 units, as the combination below expects.
            if (d == 0) { partial_max[slot] = m_all; partial_sum[slot] = sum; }
        }
    }
    if (num_splits == 1) return;

    // The last split of this sequence and head group to finish combines all of them:
    // out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s. The fence publishes this split's
    // partials before its count; the last one resets the counter for the next launch.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* counter = split_counters + (i64)seq * gridDim.x + blockIdx.x;
        is_last_split = atomicAdd(counter, 1) == num_splits - 1;
        if (is_last_split) *counter = 0;
    }
    __syncthreads();
    if (!is_last_split) return;
    __threadfence();
    // One warp per query head: first the global max and total over the splits (lanes over
    // splits), then the weighted sum of partial outputs (lanes over the head's dimensions,
    // 16-byte loads, several splits in flight). __ldcg reads L2: other SMs wrote these.
    constexpr int D4 = HEAD_DIM / 4;                     // float4s in one partial row
    constexpr int D4_PER_LANE = (D4 + 31) / 32;
    for (int g = warp; g < GROUP; g += NUM_WARPS) {
        const int head = head0 + g;
        const i64 base = ((i64)seq * num_heads + head) * max_splits;
        float m_all = NEG_INF;
        for (int s = lane; s < num_splits; s += 32) m_all = fmaxf(m_all, __ldcg(partial_max + base + s));
        m_all = warp_max(m_all);
        float total = 0.f;
        for (int s = lane; s < num_splits; s += 32) {
            // A split wholly before a sliding window has sum 0 and max -inf: weight 0.
            const float sum = __ldcg(partial_sum + base + s);
            total += sum > 0.f ? exp2f(__ldcg(partial_max + base + s) - m_all) * sum : 0.f;
        }
        const float inv_total = 1.f / warp_sum(total);
        float4 acc_d[D4_PER_LANE];
#pragma unroll
        for (int j = 0; j < D4_PER_LANE; ++j) acc_d[j] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
        for (int s = 0; s < num_splits; ++s) {
            const float sum = __ldcg(partial_sum + base + s);
            const float w = sum > 0.f ? exp2f(__ldcg(partial_max + base + s) - m_all) : 0.f;
            const float4* row = reinterpret_cast<const float4*>(partial_out + (base + s) * HEAD_DIM);
#pragma unroll
            for (int j = 0; j < D4_PER_LANE; ++j) {
                const int d4 = lane + j * 32;
                if (d4 < D4) {
                    const float4 o = __ldcg(row + d4);
                    acc_d[j].x += w * o.x; acc_d[j].y += w * o.y; acc_d[j].z += w * o.z; acc_d[j].w += w * o.w;
                }
            }
        }
        scalar_t* dst = out + seq * out_stride + (i64)head * HEAD_DIM;
#pragma unroll
        for (int j = 0; j < D4_PER_LANE; ++j) {
            const int d4 = lane + j * 32;
            if (d4 < D4) {
                dst[4 * d4] = from_float(acc_d[j].x * inv_total);
                dst[4 * d4 + 1] = from_float(acc_d[j].y * inv_total);
                dst[4 * d4 + 2] = from_float(acc_d[j].z * inv_total);
                dst[4 * d4 + 3] = from_float(acc_d[j].w * inv_total);
            }
        }
    }
}
