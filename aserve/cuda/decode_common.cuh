// What the two paged decode kernels share: the same grid (one CTA per KV head's query-head
// group, sequence and context split), so the same partition of a context, cp.async copies into
// shared memory, and the same ending: the warps' partial softmax states merged, then either the
// output written or the split's partials stored and combined by the split that finishes last.
//
// paged_attention.cu computes on CUDA cores, paged_attention_mma.cu on tensor cores; each
// defines HEAD_DIM, GROUP, NUM_WARPS and NUM_THREADS before including this file.
//
// CLUSTER_COMBINE (-D; Hopper and newer, launched by aserve/cuda/ops.py in thread block clusters
// of 1 x 1 x n CTAs): a sequence whose splits fit one cluster combines them through distributed
// shared memory, between two cluster barriers, instead of global memory. For a lone short
// sequence (B1) that takes the fence, the counter and the partials' round trips out of the end
// of every launch: 6.9 against 11.4 us at 384 tokens on an H200 (bench/RESULTS.md). A sequence
// with more splits than a cluster holds ends as in the plain build.
#pragma once

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

// What one CTA does: its sequence, KV head and first query head, and the tokens it covers.
// Each sequence divides its own visible context into at most gridDim.z partitions of whole
// units (`unit` tokens, a multiple of the block size), so the split follows the sequence's real
// length, not the longest length the launch allows: a CUDA graph captured for 8k tokens gives a
// 640-token sequence as many splits as an eager launch would, and a big batch (grid.z 1) runs
// one CTA per sequence and head group.
struct DecodeWork {
    int seq, split;   // blockIdx.y, blockIdx.z
    int kvh;          // the KV head
    int head0;        // the first of the GROUP query heads that share it
    int part_start;   // first token of the partition (a unit boundary; block ids are read from it)
    int part_end;     // one past its last token
    int t_begin;      // first token to read: part_start, or the sliding window's first visible key
    int num_splits;   // partitions of this sequence (the CTAs that do work for it)
    int newest;       // the sequence's last token (seq_len - 1): the one this step wrote
};

#if CLUSTER_COMBINE
#include "cluster.cuh"
// The most CTAs ops.py puts in one cluster (16 needs the non-portable size opt-in).
#define MAX_CLUSTER 16
// The longest partitions a context is cut into so that its splits fit one cluster (tokens;
// ops.py sets it); longer contexts are split as in the plain build.
#ifndef CLUSTER_MAX_PARTITION
#define CLUSTER_MAX_PARTITION 512
#endif

#endif

// False when this CTA has nothing to do: a padding row (seq_len 0), or a split past the
// sequence's partitions. Grid: (KV heads x groups per KV head, sequences, splits).
// seq_lens, like the block tables, is written before the step's first kernel (a step input),
// so a kernel may read it before its wait for the previous kernel (common.cuh); through L2,
// as the previous step wrote the same buffer.
__device__ __forceinline__ bool decode_work(const int* __restrict__ seq_lens, int num_heads, int num_kv_heads,
                                            int sliding_window, int unit, DecodeWork& w) {
    const int q_per_kv = num_heads / num_kv_heads;
    const int groups_per_kv = q_per_kv / GROUP;
    w.kvh = blockIdx.x / groups_per_kv;
    w.head0 = w.kvh * q_per_kv + (blockIdx.x % groups_per_kv) * GROUP;
    w.seq = blockIdx.y;
    w.split = blockIdx.z;
    const int seq_len = __ldcg(seq_lens + w.seq);
    if (seq_len <= 0) return false;
    w.newest = seq_len - 1;
    // Keys before the sliding window are invisible to the (last) query: the partitions cover
    // the visible range only, from the unit that holds its first key.
    const int first_visible = sliding_window > 0 ? max(0, seq_len - sliding_window) : 0;
    const int range_start = first_visible / unit * unit;
    const int span = seq_len - range_start;
    int partition = ((span + gridDim.z - 1) / gridDim.z + unit - 1) / unit * unit;
#if CLUSTER_COMBINE
    // Longer partitions where that fits the splits into one cluster: another tile per CTA costs
    // less than the global round trips of the plain combination.
    const int one_cluster = ((span + cluster_size() - 1) / cluster_size() + unit - 1) / unit * unit;
    if (one_cluster <= CLUSTER_MAX_PARTITION) partition = max(partition, one_cluster);
#endif
    w.num_splits = (span + partition - 1) / partition;
    if (w.split >= w.num_splits) {
#if CLUSTER_COMBINE
        // A member of the cluster that combines this sequence (the first) stays for its
        // barriers, with no tokens of its own.
        if (w.num_splits > 1 && w.num_splits <= cluster_size() && w.split < cluster_size()) {
            w.part_start = w.part_end = w.t_begin = 0;
            return true;
        }
#endif
        return false;
    }
    w.part_start = range_start + w.split * partition;
    w.part_end = min(w.part_start + partition, seq_len);
    w.t_begin = max(w.part_start, first_visible);
    return true;
}

// The partition's block ids into shared memory, once, so no copy waits on a block-table load.
// The caller synchronizes before reading them.
__device__ __forceinline__ void load_block_ids(int* blocks, const int* __restrict__ block_tables, int bt_stride,
                                               const DecodeWork& w) {
    const int* table = block_tables + (i64)w.seq * bt_stride + w.part_start / BLOCK_SIZE;
    for (int i = threadIdx.x; i * BLOCK_SIZE < w.part_end - w.part_start; i += NUM_THREADS) blocks[i] = __ldcg(table + i);
}

// The end of both kernels, from the warps' states in shared memory: warp_acc [NUM_WARPS][GROUP]
// [HEAD_DIM] unnormalised outputs, warp_max_s / warp_sum_s their running max (log2 units) and
// exp-sum. Writes the output when the sequence has one split; otherwise stores this split's
// partials, and the split that finishes last combines all of them. Every thread of the CTA
// calls it, after a __syncthreads() that publishes those states.
__device__ __forceinline__ void finish_decode(
        float* warp_acc, const float (*warp_max_s)[GROUP], const float (*warp_sum_s)[GROUP],
        bool* is_last_split, scalar_t* __restrict__ out, float* __restrict__ partial_out,
        float* __restrict__ partial_max, float* __restrict__ partial_sum, int* __restrict__ split_counters,
        i64 out_stride, int num_heads, int max_splits, int seq, int head0, int split, int num_splits) {
#if CLUSTER_COMBINE
    // The sequence's splits all in this cluster (the same answer in each of its CTAs): this CTA's
    // state stays in its shared memory for the others, its outputs in warp 0's rows of warp_acc
    // (element idx of that row is read only by the thread that writes it here).
    const bool in_cluster = num_splits <= cluster_size();
    __shared__ float cta_max_s[GROUP], cta_sum_s[GROUP];
#endif
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
#if CLUSTER_COMBINE
        } else if (in_cluster) {
            warp_acc[idx] = total;
            if (d == 0) { cta_max_s[g] = m_all; cta_sum_s[g] = sum; }
#endif
        } else {
            const i64 slot = ((i64)seq * num_heads + head) * max_splits + split;
            partial_out[slot * HEAD_DIM + d] = total;
            // The split's max stays in log2 units, as the combination below expects.
            if (d == 0) { partial_max[slot] = m_all; partial_sum[slot] = sum; }
        }
    }
    if (num_splits == 1) return;
#if CLUSTER_COMBINE
    if (in_cluster) {
        cluster_sync();
        // Each CTA of the cluster takes a share of the output elements; for each, every split's
        // state is loaded first (all loads in flight at once), then combined.
        const int csize = cluster_size(), rank = cluster_rank();
        for (int idx = rank * NUM_THREADS + threadIdx.x; idx < GROUP * HEAD_DIM; idx += csize * NUM_THREADS) {
            const int g = idx / HEAD_DIM, d = idx % HEAD_DIM;
            float m_r[MAX_CLUSTER], sum_r[MAX_CLUSTER], out_r[MAX_CLUSTER];
#pragma unroll
            for (int r = 0; r < MAX_CLUSTER; ++r) {
                m_r[r] = r < num_splits ? load_cluster(cta_max_s + g, r) : NEG_INF;
                sum_r[r] = r < num_splits ? load_cluster(cta_sum_s + g, r) : 0.f;
                out_r[r] = r < num_splits ? load_cluster(warp_acc + idx, r) : 0.f;
            }
            float m_all = NEG_INF;
#pragma unroll
            for (int r = 0; r < MAX_CLUSTER; ++r) m_all = fmaxf(m_all, m_r[r]);
            float total = 0.f, sum = 0.f;
#pragma unroll
            for (int r = 0; r < MAX_CLUSTER; ++r) {
                const float a = m_r[r] == NEG_INF ? 0.f : exp2f(m_r[r] - m_all);
                total += a * out_r[r];
                sum += a * sum_r[r];
            }
            out[seq * out_stride + (i64)(head0 + g) * HEAD_DIM + d] = from_float(total / sum);
        }
        cluster_sync();   // no CTA leaves, its shared memory with it, before the others read it
        return;
    }
#endif

    // The last split of this sequence and head group to finish combines all of them:
    // out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s. The fence publishes this split's
    // partials before its count; the last one resets the counter for the next launch.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* counter = split_counters + (i64)seq * gridDim.x + blockIdx.x;
        *is_last_split = atomicAdd(counter, 1) == num_splits - 1;
        if (*is_last_split) *counter = 0;
    }
    __syncthreads();
    if (!*is_last_split) return;
    __threadfence();
    // One warp per query head: first the global max and total over the splits (lanes over
    // splits), then the weighted sum of partial outputs (lanes over the head's dimensions,
    // 16-byte loads, several splits in flight). __ldcg reads L2: other SMs wrote these.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
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
