// Paged attention for decode: one query token per sequence over its context in the paged KV
// cache [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM] (keys and values apart).
//
// One thread block (CTA) takes one KV head, GROUP of the query heads that share it, one
// sequence and one partition of its context, so each key and value is read once for all the
// query heads of its group (grouped-query attention costs no extra bytes). Each token slot of
// a warp keeps an online softmax (running max, sum and weighted values), so keys and values of
// a pass are loaded together and nothing waits between a score phase and a value phase; slots
// and warps are merged at the end. Long contexts are split over several CTAs (grid.z) so that
// even one sequence fills the GPU; each split writes an unnormalised partial output with its
// max and exp-sum, and paged_decode_reduce combines them. With one split the CTA writes the
// final output itself.
//
// Compile-time configuration (-D, set by aserve/cuda/ops.py): DTYPE, HEAD_DIM, BLOCK_SIZE, GROUP.
// The partition size is a launch argument (a multiple of BLOCK_SIZE, at most MAX_PARTITION),
// so the launcher can trade split count against work per CTA for each batch shape.
#include "common.cuh"

#define NUM_THREADS 128
#define NUM_WARPS (NUM_THREADS / 32)
// Tokens per slot in one pass (their keys and values are all in flight at once); fewer for big
// query-head groups, whose registers would otherwise spill.
#define UNROLL (GROUP > 4 ? 2 : 4)
#define MAX_PARTITION 1024
#define MAX_SPLITS 1024

#define CHUNKS (HEAD_DIM / VEC)                    // 16-byte vectors in one head row
// Lanes that share one token row: the power of two covering the row's vectors, at most a warp.
#define LANES (CHUNKS >= 32 ? 32 : CHUNKS > 8 ? 16 : CHUNKS > 4 ? 8 : CHUNKS > 2 ? 4 : CHUNKS > 1 ? 2 : 1)
#define CPL ((CHUNKS + LANES - 1) / LANES)         // vectors per lane
#define TPW (32 / LANES)                           // tokens a warp covers at once
#define TOKENS_PER_PASS (NUM_WARPS * TPW)

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

extern "C" __global__ void __launch_bounds__(NUM_THREADS)
paged_decode(scalar_t* __restrict__ out,              // [num_seqs, num_heads, HEAD_DIM] rows of out_stride
             float* __restrict__ partial_out,         // [num_seqs, num_heads, max_splits, HEAD_DIM]
             float* __restrict__ partial_max,         // [num_seqs, num_heads, max_splits]
             float* __restrict__ partial_sum,         // [num_seqs, num_heads, max_splits]
             const scalar_t* __restrict__ query,      // [num_seqs, num_heads, HEAD_DIM] rows of q_stride
             const scalar_t* __restrict__ k_cache,
             const scalar_t* __restrict__ v_cache,
             const int* __restrict__ block_tables,    // [num_seqs, bt_stride]
             const int* __restrict__ seq_lens,        // [num_seqs]; 0 marks a padding row
             i64 q_stride, i64 out_stride, int bt_stride,
             int num_heads, int num_kv_heads, float scale, int max_splits, int partition,
             int sliding_window) {
    // partition (tokens per split) is a multiple of BLOCK_SIZE, at most MAX_PARTITION.
    __shared__ int blocks[MAX_PARTITION / BLOCK_SIZE];
    __shared__ float warp_max_s[NUM_WARPS][GROUP], warp_sum_s[NUM_WARPS][GROUP];
    __shared__ float warp_acc[NUM_WARPS][GROUP][HEAD_DIM];

    const int q_per_kv = num_heads / num_kv_heads;
    const int groups_per_kv = q_per_kv / GROUP;
    const int kvh = blockIdx.x / groups_per_kv;
    const int head0 = kvh * q_per_kv + (blockIdx.x % groups_per_kv) * GROUP;
    const int seq = blockIdx.y;
    const int split = blockIdx.z;
    const int seq_len = seq_lens[seq];
    const int part_start = split * partition;
    if (part_start >= seq_len) return;
    const int part_end = min(part_start + partition, seq_len);
    // Keys before the sliding window are invisible to the (last) query.
    const int first_visible = sliding_window > 0 ? max(0, seq_len - sliding_window) : 0;
    const int t_begin = max(part_start, first_visible);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int sub = lane / LANES;                    // which of the warp's TPW tokens
    const int lane_in_row = lane % LANES;

    // The partition's block ids, once, so no key load waits on a block-table load.
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
                load_vec(query + seq * q_stride + (i64)(head0 + g) * HEAD_DIM + chunk * VEC, q[g][c]);
#pragma unroll
                for (int i = 0; i < VEC; ++i) q[g][c][i] *= scale * 1.44269504f;
            } else {
#pragma unroll
                for (int i = 0; i < VEC; ++i) q[g][c][i] = 0.f;
            }
        }
    }
    __syncthreads();

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
    for (int t0 = t_begin + warp * TPW; t0 < part_end; t0 += TOKENS_PER_PASS * UNROLL) {
        // Every load of the pass first (keys and values), then the arithmetic.
        uint4 k_raw[UNROLL][CPL], v_raw[UNROLL][CPL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int t = t0 + u * TOKENS_PER_PASS + sub;
            const int local = t - part_start;
            const i64 row = t < part_end
                ? ((i64)blocks[local / BLOCK_SIZE] * BLOCK_SIZE + local % BLOCK_SIZE) * num_kv_heads + kvh : 0;
#pragma unroll
            for (int c = 0; c < CPL; ++c) {
                const int chunk = lane_in_row + c * LANES;
                if (t < part_end && chunk < CHUNKS) {
                    k_raw[u][c] = *reinterpret_cast<const uint4*>(k_cache + row * HEAD_DIM + chunk * VEC);
                    v_raw[u][c] = *reinterpret_cast<const uint4*>(v_cache + row * HEAD_DIM + chunk * VEC);
                } else {
                    k_raw[u][c] = make_uint4(0, 0, 0, 0);
                    v_raw[u][c] = make_uint4(0, 0, 0, 0);
                }
            }
        }
        float s[UNROLL][GROUP];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            float k[CPL][VEC];
#pragma unroll
            for (int c = 0; c < CPL; ++c) unpack_vec(k_raw[u][c], k[c]);
            const bool valid = t0 + u * TOKENS_PER_PASS + sub < part_end;
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
                float v[CPL][VEC];
#pragma unroll
                for (int c = 0; c < CPL; ++c) unpack_vec(v_raw[u][c], v[c]);
#pragma unroll
                for (int c = 0; c < CPL; ++c)
#pragma unroll
                    for (int i = 0; i < VEC; ++i) acc[g][c][i] += p * v[c][i];
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
    // ... then the warps, through shared memory.
    if (sub == 0) {
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            if (lane == 0) { warp_max_s[warp][g] = m[g]; warp_sum_s[warp][g] = l[g]; }
#pragma unroll
            for (int c = 0; c < CPL; ++c) {
                const int chunk = lane_in_row + c * LANES;
                if (chunk < CHUNKS) {
#pragma unroll
                    for (int i = 0; i < VEC; ++i) warp_acc[warp][g][chunk * VEC + i] = acc[g][c][i];
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
            total += a * warp_acc[w][g][d];
            sum += a * warp_sum_s[w][g];
        }
        const int head = head0 + g;
        if (max_splits == 1) {
            out[seq * out_stride + (i64)head * HEAD_DIM + d] = from_float(total / sum);
        } else {
            const i64 slot = ((i64)seq * num_heads + head) * max_splits + split;
            partial_out[slot * HEAD_DIM + d] = total;
            // The split's max stays in log2 units; paged_decode_reduce expects them so.
            if (d == 0) { partial_max[slot] = m_all; partial_sum[slot] = sum; }
        }
    }
}

// Combines the splits of paged_decode: out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s
// (maxima in log2 units, as paged_decode keeps them). Grid (num_heads, num_seqs). Splits past a
// sequence's length were never written and are skipped.
extern "C" __global__ void __launch_bounds__(NUM_THREADS)
paged_decode_reduce(scalar_t* __restrict__ out, const float* __restrict__ partial_out,
                    const float* __restrict__ partial_max, const float* __restrict__ partial_sum,
                    const int* __restrict__ seq_lens, i64 out_stride, int num_heads, int max_splits,
                    int partition) {
    __shared__ float weight[MAX_SPLITS];
    __shared__ float inv_total;
    const int head = blockIdx.x, seq = blockIdx.y;
    const int seq_len = seq_lens[seq];
    if (seq_len == 0) return;
    const int num_splits = min(max_splits, (seq_len + partition - 1) / partition);
    const i64 base = ((i64)seq * num_heads + head) * max_splits;
    if (threadIdx.x < 32) {
        float m = NEG_INF;
        for (int s = threadIdx.x; s < num_splits; s += 32) m = fmaxf(m, partial_max[base + s]);
        m = warp_max(m);
        float total = 0.f;
        for (int s = threadIdx.x; s < num_splits; s += 32) {
            // A split wholly before a sliding window has sum 0 and max -inf: weight 0.
            const float w = partial_sum[base + s] > 0.f ? exp2f(partial_max[base + s] - m) : 0.f;
            weight[s] = w;
            total += w * partial_sum[base + s];
        }
        total = warp_sum(total);
        if (threadIdx.x == 0) inv_total = 1.f / total;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < HEAD_DIM; d += NUM_THREADS) {
        float acc = 0.f;
        for (int s = 0; s < num_splits; ++s) acc += weight[s] * partial_out[(base + s) * HEAD_DIM + d];
        out[seq * out_stride + (i64)head * HEAD_DIM + d] = from_float(acc * inv_total);
    }
}
