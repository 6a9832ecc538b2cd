// Paged attention for decode on tensor cores: the grid, the context partitions, the inputs and
// the outputs of paged_attention.cu (one CTA per KV head's group of GROUP query heads, sequence
// and split), with the arithmetic in mma.sync instead of CUDA-core FMAs.
//
// Why: with grouped-query attention the CUDA-core kernel does GROUP dot products per key it
// reads, each over HEAD_DIM / 8 lanes and closed by a shuffle reduction, then GROUP weighted
// sums of values. At 4 query heads per KV head, head size 128 and a full batch that is ~75M
// warp instructions a layer against ~155 us of K/V bytes at the copy ceiling on an H200: about
// half issue-bound (bench/RESULTS.md, 2026-12-03). Here a warp does a 16-token chunk's scores
// for all heads of the group in 16 mma instructions and their weighted values in 16 more.
//
// The layout is FlashAttention-2's, with the group's query heads as the rows of the m16n8k16
// tiles (rows past GROUP are zero padding; GROUP <= 8 uses rows 0-7 only):
//   S = Q K^T: A = Q (heads x dims, in registers for the whole kernel), B = K^T read from
//              shared memory with ldmatrix (a key row is a column of B: no transpose);
//   O += P V:  A = P, the score tile's accumulators packed to 16 bits (the C fragments of two
//              8-token tiles are exactly the A fragment of one 16-token step), B = V read with
//              ldmatrix.trans.
// Each warp keeps its own online softmax over the chunks it visits (the chunk `warp` of every
// tile); the warps are merged through shared memory at the end (decode_common.cuh). P is
// rounded to the model's 16-bit type before the PV product, as FlashAttention does.
//
// Shared memory holds STAGES tiles of NUM_WARPS * 16 tokens of keys and values, filled with
// cp.async, the 16-byte chunks of each token row XOR-swizzled by the token's index mod 8, so the
// eight rows an ldmatrix reads at once fall into eight different bank groups. The stages are
// dynamic shared memory (the launcher sets the kernel's limit).
//
// Compile-time configuration (-D, set by aserve/cuda/ops.py): DTYPE (1 float16 or 2 bfloat16),
// HEAD_DIM (64 or 128: a multiple of 64, so the swizzle stays inside a row, and small enough
// for the accumulators' registers), BLOCK_SIZE, GROUP (<= 8), MAX_PARTITION; tuning: NUM_WARPS,
// STAGES.
#include "common.cuh"

#ifndef NUM_WARPS
#define NUM_WARPS 4
#endif
#define NUM_THREADS (NUM_WARPS * 32)
#ifndef STAGES
#define STAGES 2
#endif

#define CHUNKS (HEAD_DIM / 8)                      // 16-byte chunks in one head row
#define K_STEPS (HEAD_DIM / 16)                    // k-steps of the score product
#define DIM_TILES (HEAD_DIM / 8)                   // 8-wide output tiles of the value product
#define TILE (NUM_WARPS * 16)                      // tokens per shared-memory stage
#define TILE_VECS (TILE * CHUNKS)

static_assert(DTYPE == 1 || DTYPE == 2, "the tensor-core decode kernel takes float16 or bfloat16");
static_assert(HEAD_DIM % 64 == 0 && HEAD_DIM <= 128, "HEAD_DIM must be 64 or 128");
static_assert(GROUP >= 1 && GROUP <= 8, "GROUP must be 1-8");
static_assert(NUM_WARPS * GROUP * HEAD_DIM * 4 <= 2 * STAGES * TILE_VECS * 16,
              "the warps' merge buffer must fit in the stage buffers");

#include "decode_common.cuh"

// c += a * b for one m16n8k16 tile, rows 0-7 only: a1 and a3 (rows 8-15 of A) are zero, and
// the lane's two accumulators of rows 8-15 go to throwaway registers, so no accumulator array
// carries them (32 registers fewer at head size 128).
__device__ __forceinline__ void mma_16816(float* c, unsigned a0, unsigned a2, unsigned b0, unsigned b1) {
    float pad0 = 0.f, pad1 = 0.f;
#if DTYPE == 2
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#endif
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(pad0), "+f"(pad1)
                 : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned* r, unsigned smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, unsigned smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr));
}

// Two floats rounded to the element type, low one first (the order mma fragments hold them).
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    return (unsigned)from_float(lo) | ((unsigned)from_float(hi) << 16);
}

// Where 16-byte chunk `chunk` of token row `token` of a stage lies, in chunks.
__device__ __forceinline__ int swizzled(int token, int chunk) { return token * CHUNKS + (chunk ^ (token & 7)); }

extern "C" __global__ void __launch_bounds__(NUM_THREADS)
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
    extern __shared__ uint4 smem[];                   // [STAGES][keys, values][TILE][CHUNKS]
    __shared__ int blocks[MAX_PARTITION / BLOCK_SIZE];
    __shared__ float warp_max_s[NUM_WARPS][GROUP], warp_sum_s[NUM_WARPS][GROUP];
    __shared__ bool is_last_split;
    start_after_previous_kernel();

    DecodeWork work;
    if (!decode_work(seq_lens, num_heads, num_kv_heads, sliding_window, unit, work)) return;
    const int seq = work.seq, kvh = work.kvh, head0 = work.head0;
    const int part_start = work.part_start, part_end = work.part_end, t_begin = work.t_begin;
    const int num_tiles = t_begin < part_end ? (part_end - t_begin + TILE - 1) / TILE : 0;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = lane / 4;                         // the fragment row (query head) of this lane
    const int quad = lane % 4;                        // its column pair within the row

    load_block_ids(blocks, block_tables, bt_stride, work);

    // The A fragments of Q: row `row` (a query head of the group, zero past GROUP), dims
    // 16k + 2 quad (+1) and 16k + 8 + 2 quad (+1) for every k-step.
    unsigned q_frag[K_STEPS][2];
#pragma unroll
    for (int k = 0; k < K_STEPS; ++k) {
        q_frag[k][0] = q_frag[k][1] = 0u;
        if (row < GROUP) {
            const unsigned* q_row = reinterpret_cast<const unsigned*>(query + seq * q_stride + (i64)(head0 + row) * HEAD_DIM);
            q_frag[k][0] = __ldcg(q_row + 8 * k + quad);
            q_frag[k][1] = __ldcg(q_row + 8 * k + 4 + quad);
        }
    }
    __syncthreads();

    // Copies tile `tile` (tokens from t_begin + tile * TILE) into stage `stage`; tokens past the
    // partition come as zeros and get probability 0.
    auto load_tile = [&](int tile, int stage) {
        uint4* k_stage = smem + stage * 2 * TILE_VECS;
        uint4* v_stage = k_stage + TILE_VECS;
        const int tile_start = t_begin + tile * TILE;
#pragma unroll
        for (int i = 0; i < TILE_VECS / NUM_THREADS; ++i) {
            const int v = threadIdx.x + i * NUM_THREADS;
            const int token = v / CHUNKS, chunk = v % CHUNKS;
            const int t = tile_start + token;
            const bool valid = t < part_end;
            const int local = valid ? t - part_start : 0;
            const i64 cache_row = ((i64)blocks[local / BLOCK_SIZE] * BLOCK_SIZE + local % BLOCK_SIZE) * num_kv_heads + kvh;
            const i64 offset = cache_row * HEAD_DIM + chunk * 8;
            const int at = swizzled(token, chunk);
            cp_async16(k_stage + at, k_cache + offset, valid ? 16 : 0);
            cp_async16(v_stage + at, v_cache + offset, valid ? 16 : 0);
        }
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < num_tiles) load_tile(s, s);
        cp_async_commit();                            // empty groups keep the wait counts uniform
    }

    const float scale_log2 = scale * 1.44269504f;     // softmax in base 2 (exp2 below)
    float m_run = NEG_INF, l_run = 0.f;               // this lane's row; l_run over its columns only
    float acc[DIM_TILES][2];                          // row `row`, dims 8n + 2 quad (+1)
#pragma unroll
    for (int n = 0; n < DIM_TILES; ++n) acc[n][0] = acc[n][1] = 0.f;

    // ldmatrix row addresses: lane L supplies row L % 8 of matrix L / 8.
    const int ld_row = lane % 8, ld_matrix = lane / 8;
    const unsigned smem_base = (unsigned)__cvta_generic_to_shared(smem);

    for (int tile = 0; tile < num_tiles; ++tile) {
        cp_async_wait<STAGES - 2>();                 // this thread's copies of `tile` landed
        __syncthreads();                              // everyone's did; the oldest stage is free
        if (tile + STAGES - 1 < num_tiles) load_tile(tile + STAGES - 1, (tile + STAGES - 1) % STAGES);
        cp_async_commit();
        const int chunk_token0 = warp * 16;           // this warp's 16 tokens within the tile
        const unsigned k_stage = smem_base + (tile % STAGES) * 2 * TILE_VECS * 16;
        const unsigned v_stage = k_stage + TILE_VECS * 16;

        // Scores of the 16 tokens, as two 8-token C tiles: s[j][e] is row `row`, token
        // 8j + 2 quad + e.
        float s[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int token = chunk_token0 + 8 * j + ld_row;
#pragma unroll
            for (int kp = 0; kp < K_STEPS / 2; ++kp) {
                unsigned b[4];                        // chunks 4kp .. 4kp+3 of the 8 tokens: two k-steps
                ldmatrix_x4(b, k_stage + swizzled(token, 4 * kp + ld_matrix) * 16);
                mma_16816(s[j], q_frag[2 * kp][0], q_frag[2 * kp][1], b[0], b[1]);
                mma_16816(s[j], q_frag[2 * kp + 1][0], q_frag[2 * kp + 1][1], b[2], b[3]);
            }
        }
        const int tile_start = t_begin + tile * TILE + chunk_token0;
        float chunk_max = NEG_INF;
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const bool valid = tile_start + 8 * j + 2 * quad + e < part_end;
                s[j][e] = valid ? s[j][e] * scale_log2 : NEG_INF;
                chunk_max = fmaxf(chunk_max, s[j][e]);
            }
        chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, 1));
        chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, 2));
        const float m_new = fmaxf(m_run, chunk_max);
        // Until the row has seen a visible token, m_new is -inf: subtract 0 instead, so the
        // masked scores give exp2(-inf) = 0 rather than NaN. The control flow stays uniform:
        // mma.sync needs the whole warp.
        const float m_use = m_new == NEG_INF ? 0.f : m_new;
        const float alpha = exp2f(m_run - m_use);     // 0 while m_run is -inf
        m_run = m_new;
        float prob[2][2];
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) prob[j][e] = exp2f(s[j][e] - m_use);
        l_run = l_run * alpha + (prob[0][0] + prob[0][1]) + (prob[1][0] + prob[1][1]);
#pragma unroll
        for (int n = 0; n < DIM_TILES; ++n) { acc[n][0] *= alpha; acc[n][1] *= alpha; }
        const unsigned p_lo = pack2(prob[0][0], prob[0][1]);   // tokens 2 quad (+1)
        const unsigned p_hi = pack2(prob[1][0], prob[1][1]);   // tokens 8 + 2 quad (+1)

        // O += P V over the 16 tokens: ldmatrix.trans gives B fragments (tokens x dims) of two
        // 8-dim tiles at once: matrices (tokens 0-7, chunk 2q), (8-15, 2q), (0-7, 2q+1), (8-15, 2q+1).
        const int v_token = chunk_token0 + (ld_matrix % 2) * 8 + ld_row;
#pragma unroll
        for (int q = 0; q < DIM_TILES / 2; ++q) {
            unsigned b[4];
            ldmatrix_x4_trans(b, v_stage + swizzled(v_token, 2 * q + ld_matrix / 2) * 16);
            mma_16816(acc[2 * q], p_lo, p_hi, b[0], b[1]);
            mma_16816(acc[2 * q + 1], p_lo, p_hi, b[2], b[3]);
        }
    }
    // The row's exp-sum over the quad's columns.
    l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
    l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);

    // Merge the warps through shared memory (the stage buffers, now that every copy has landed
    // and every warp is past its last tile).
    cp_async_wait<0>();
    __syncthreads();
    float* warp_acc = reinterpret_cast<float*>(smem);  // [NUM_WARPS][GROUP][HEAD_DIM]
    if (row < GROUP) {
        if (quad == 0) { warp_max_s[warp][row] = m_run; warp_sum_s[warp][row] = l_run; }
        float* dst = warp_acc + (warp * GROUP + row) * HEAD_DIM + 2 * quad;
#pragma unroll
        for (int n = 0; n < DIM_TILES; ++n) { dst[8 * n] = acc[n][0]; dst[8 * n + 1] = acc[n][1]; }
    }
    __syncthreads();
    finish_decode(warp_acc, warp_max_s, warp_sum_s, &is_last_split, out, partial_out, partial_max, partial_sum,
                  split_counters, out_stride, num_heads, max_splits, seq, head0, work.split, work.num_splits);
}
