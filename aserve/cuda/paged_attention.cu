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
// How a context is partitioned over splits, and the ending both decode kernels share, are in
// decode_common.cuh; paged_attention_mma.cu is the tensor-core kernel for the same grid.
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
static_assert(CHUNKS <= NUM_THREADS, "the newest token's row is loaded by one thread a vector");
// The warps' merge buffer reuses the stage buffers once the last tile is consumed.
#define MERGE_VECS ((NUM_WARPS * GROUP * HEAD_DIM + 3) / 4)
#define STAGE_AREA_VECS (2 * STAGES * TILE_VECS)
#define SMEM_VECS (STAGE_AREA_VECS > MERGE_VECS ? STAGE_AREA_VECS : MERGE_VECS)

#include "decode_common.cuh"

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
    // Before the wait for the previous kernel (which rotates the query and stores the step's
    // new key and value): everything of the context but its newest token was written before
    // this step's first kernel, so the sequence's length, its block ids and the first tiles'
    // keys and values are read under that kernel (common.cuh says why that is safe). At B1
    // that takes two round trips to L2 and one to memory out of every layer's chain.
    DecodeWork work;
    if (!decode_work(seq_lens, num_heads, num_kv_heads, sliding_window, unit, work)) {
        start_after_previous_kernel();
        return;
    }
    const int seq = work.seq, kvh = work.kvh, head0 = work.head0;
    const int part_start = work.part_start, part_end = work.part_end, t_begin = work.t_begin;
    const int num_tiles = t_begin < part_end ? (part_end - t_begin + TILE - 1) / TILE : 0;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int sub = lane / LANES;                    // which of the warp's TPW tokens
    const int lane_in_row = lane % LANES;

    load_block_ids(blocks, block_tables, bt_stride, work);
    __syncthreads();

    // The cache row of `token` (of this partition) for this CTA's KV head, in elements.
    auto cache_offset = [&](int token, int chunk) {
        const int local = token - part_start;
        const i64 row = ((i64)blocks[local / BLOCK_SIZE] * BLOCK_SIZE + local % BLOCK_SIZE) * num_kv_heads + kvh;
        return row * HEAD_DIM + chunk * VEC;
    };
    // Copies tile `tile` (tokens from t_begin + tile * TILE) into stage `stage`; tokens past
    // the partition come as zeros and are masked out of the softmax. Before the wait the
    // newest token is left out (`skip`): the previous kernel is still writing it, and it is
    // stored into its slot after the wait, before the first tile is read.
    auto load_tile = [&](int tile, int stage, int skip) {
        const int tile_start = t_begin + tile * TILE;
#pragma unroll
        for (int i = 0; i < (TILE_VECS + NUM_THREADS - 1) / NUM_THREADS; ++i) {
            const int v = threadIdx.x + i * NUM_THREADS;
            if (TILE_VECS % NUM_THREADS != 0 && v >= TILE_VECS) break;
            const int token = v / CHUNKS, chunk = v % CHUNKS;
            const int t = tile_start + token;
            const bool valid = t < part_end;
            if (valid && t == skip) continue;         // (a slot past the end still gets its zeros)
            const i64 offset = cache_offset(valid ? t : part_start, chunk);
            cp_async16(k_tiles + stage * TILE_VECS + v, k_cache + offset, valid ? 16 : 0);
            cp_async16(v_tiles + stage * TILE_VECS + v, v_cache + offset, valid ? 16 : 0);
        }
    };
    const int prologue_tiles = num_tiles < STAGES - 1 ? num_tiles : STAGES - 1;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < num_tiles) load_tile(s, s, work.newest);
        cp_async_commit();                            // empty groups keep the wait counts uniform
    }

    start_after_previous_kernel();
    // After the wait: the query, and the newest token's key and value if a prologue tile holds
    // it (into the tile's slot, visible after the loop's first barrier). All loads go out
    // before any of them is used, so they take one round trip.
    uint4 q_raw[GROUP][CPL];
#pragma unroll
    for (int g = 0; g < GROUP; ++g)
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
            const int chunk = lane_in_row + c * LANES;
            q_raw[g][c] = chunk < CHUNKS ? load_fresh(reinterpret_cast<const uint4*>(
                query + seq * q_stride + (i64)(head0 + g) * HEAD_DIM + chunk * VEC)) : make_uint4(0, 0, 0, 0);
        }
    const int newest_in_tiles = work.newest - t_begin;
    if (work.newest < part_end && newest_in_tiles >= 0 && newest_in_tiles < prologue_tiles * TILE &&
        threadIdx.x < CHUNKS) {
        const i64 offset = cache_offset(work.newest, threadIdx.x);
        const uint4 key = load_fresh(reinterpret_cast<const uint4*>(k_cache + offset));
        const uint4 value = load_fresh(reinterpret_cast<const uint4*>(v_cache + offset));
        const int v = (newest_in_tiles / TILE) * TILE_VECS + (newest_in_tiles % TILE) * CHUNKS + threadIdx.x;
        k_tiles[v] = key;
        v_tiles[v] = value;
    }
    // This lane's slice of the GROUP query vectors, pre-scaled by scale * log2(e) (exp2 below).
    float q[GROUP][CPL][VEC];
#pragma unroll
    for (int g = 0; g < GROUP; ++g)
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
            unpack_vec(q_raw[g][c], q[g][c]);
#pragma unroll
            for (int i = 0; i < VEC; ++i) q[g][c][i] *= scale * 1.44269504f;
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
        if (tile + STAGES - 1 < num_tiles) load_tile(tile + STAGES - 1, (tile + STAGES - 1) % STAGES, -1);
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
    finish_decode(warp_acc, warp_max_s, warp_sum_s, &is_last_split, out, partial_out, partial_max, partial_sum,
                  split_counters, out_stride, num_heads, max_splits, seq, head0, work.split, work.num_splits);
}
