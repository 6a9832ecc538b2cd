// One token per row of logits [rows, vocab] in one pass: the argmax over the vocabulary of
// logit / T + g_i, with g_i Gumbel noise, which draws token i with probability
// softmax(logits / T)_i (the Gumbel-max trick); a row with T = 0 takes the plain argmax.
//
// It replaces a chain of torch ops over the whole [rows, vocab] matrix (float copy, divide by
// T, softmax, exponential noise, clamp, divide, argmax), seven passes that took 0.6 ms of a
// 15 ms decode step of Llama-8B at batch 256 on an H200 (bench/RESULTS.md).
//
// The noise is a function of (the row's 64-bit key, token id) only: a counter-based hash, no
// RNG state. The sampler draws each row's key from that row's generator, so a seeded request
// draws the same noise at any batch position. aserve/worker/gumbel.py computes the same noise
// with torch ops: the reference for tests and the CPU's sampler.
//
// Compile-time configuration (-D, set by aserve/cuda/sampling.py): DTYPE of the logits.
#include "common.cuh"
#if __CUDA_ARCH__ >= 900
#include "cluster.cuh"
#endif

#define SAMPLE_THREADS 1024
#define NEG_INF (-__int_as_float(0x7f800000))
// No noise value exceeds -log(-log(1 - 2^-24)) = 16.64 (the uniform's resolution, below), so a
// token whose scaled logit is GUMBEL_BOUND below the best score so far cannot win: its hash
// is skipped. The bound holds with room for __logf's error.
#define GUMBEL_BOUND 17.0f

// A bijective mixer of 32-bit words (Chris Wellons' "lowbias32" constants).
__device__ __forceinline__ unsigned mix32(unsigned x) {
    x ^= x >> 16;
    x *= 0x21f0aaadu;
    x ^= x >> 15;
    x *= 0xd35a2d97u;
    x ^= x >> 15;
    return x;
}

// Gumbel noise of token i under key (lo, hi): the uniform v = (2k + 1) 2^-24 from the top 23
// bits k of the hash (exact in float32, never 0 or 1), the exponential q = -log(1 - v) (a series
// for small v, where 1 - v would round), and g = -log(q).
__device__ __forceinline__ float gumbel(unsigned lo, unsigned hi, unsigned i) {
    const unsigned h = mix32(mix32(i ^ lo) + hi);
    const float v = (float)((h >> 9) * 2u + 1u) * 5.9604644775390625e-8f;  // 2^-24
    const float q = v < 9.765625e-4f ? v * (1.f + 0.5f * v) : -__logf(1.f - v);
    return -__logf(q);
}

// (score, index) pairs: the higher score wins, the lower index on a tie (torch.argmax's choice).
__device__ __forceinline__ void keep_best(float& best, int& best_i, float s, int i) {
    if (s > best || (s == best && i < best_i)) { best = s; best_i = i; }
}

// torch.argmax's order: NaN above every number (the first NaN wins), and of equal scores the
// lower index. Greedy decoding must pick exactly the token torch.argmax picks.
__device__ __forceinline__ void keep_max(float& best, int& best_i, float s, int i) {
    const bool s_nan = s != s, best_nan = best != best;
    if (best_nan ? (s_nan && i < best_i) : (s_nan || s > best || (s == best && i < best_i))) {
        best = s;
        best_i = i;
    }
}

// The CTA's winning (best, best_i) over every thread's, left in thread 0's: across each warp
// with shuffles, then across the warps through shared memory. NAN_WINS: keep_max's order (a
// NaN wins), else keep_best's (a NaN never does). Index 0x7fffffff where no thread kept anything.
template <bool NAN_WINS>
__device__ __forceinline__ void block_best(float& best, int& best_i) {
    __shared__ float warp_best[SAMPLE_THREADS / 32];
    __shared__ int warp_best_i[SAMPLE_THREADS / 32];
    auto keep = [](float& b, int& b_i, float s, int i) {
        if (NAN_WINS) keep_max(b, b_i, s, i);
        else keep_best(b, b_i, s, i);
    };
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float s = __shfl_xor_sync(0xffffffffu, best, o);
        const int i = __shfl_xor_sync(0xffffffffu, best_i, o);
        keep(best, best_i, s, i);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) { warp_best[warp] = best; warp_best_i[warp] = best_i; }
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x / 32;
        best = lane < warps ? warp_best[lane] : NEG_INF;
        best_i = lane < warps ? warp_best_i[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float s = __shfl_xor_sync(0xffffffffu, best, o);
            const int i = __shfl_xor_sync(0xffffffffu, best_i, o);
            keep(best, best_i, s, i);
        }
    }
}

// block_best's winning index alone.
template <bool NAN_WINS>
__device__ __forceinline__ int block_best_index(float best, int best_i) {
    block_best<NAN_WINS>(best, best_i);
    return best_i;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_gumbel_max(i64* __restrict__ out,              // [rows]
                  const scalar_t* __restrict__ logits,  // [rows, vocab], rows of row_stride
                  i64 row_stride, int vocab,
                  const float* __restrict__ temperatures,  // [rows]; 0: greedy
                  const i64* __restrict__ keys) {         // [rows]
    const int row = blockIdx.x;
    const float t = temperatures[row];
    const bool greedy = !(t > 0.f);
    const float inv_t = greedy ? 1.f : 1.f / t;
    const unsigned long long key = (unsigned long long)keys[row];
    const unsigned lo = (unsigned)key, hi = (unsigned)(key >> 32);
    const scalar_t* x = logits + row * row_stride;

    float best = NEG_INF;
    int best_i = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float s = to_float(x[i]) * inv_t;
        if (!greedy) {
            if (!(s + GUMBEL_BOUND > best)) continue;   // cannot win (or -inf: masked)
            s += gumbel(lo, hi, (unsigned)i);
        }
        keep_best(best, best_i, s, i);
    }
    const int winner = block_best_index<false>(best, best_i);
    // Every score -inf or NaN (a row masked whole): token 0, as torch.argmax of -infs.
    if (threadIdx.x == 0) out[row] = winner == 0x7fffffff ? 0 : winner;
}

#define ARGMAX_UNROLL 4

// The argmax of each row of logits [rows, vocab] (greedy decoding). torch's argmax reduced a
// lone 128k-token row in ~30 us on an H200 (bench/profile_step.py: a B1 step's last kernel);
// one CTA a row here took 13.4 us, bound by what one SM keeps in flight. So a row may be cut
// into gridDim.z contiguous parts, one CTA each: on Hopper those CTAs form a thread block
// cluster (aserve/cuda/sampling.py launches 1 x 1 x gridDim.z clusters), and the part of
// cluster rank 0 combines every part's (best, index) through distributed shared memory.
// keep_max's order is total (NaN first, then value, then the lower index), so the parts may
// combine in any order and give torch.argmax's id.
// vectorized: the rows start on 16-byte boundaries (else every element is loaded alone).
// The clustered launch goes under programmatic dependent launch: each CTA first waits for the
// kernel that wrote the logits (a no-op in the plain launch).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
argmax_rows(i64* __restrict__ out,                   // [rows]
            const scalar_t* __restrict__ logits,     // [rows, vocab], rows of row_stride
            i64 row_stride, int vocab, int vectorized) {
    start_after_previous_kernel();
    const scalar_t* x = logits + blockIdx.x * row_stride;
    const int parts = gridDim.z, part = blockIdx.z;
    float best = NEG_INF;
    int best_i = 0x7fffffff;
    int scalar_from = 0;
    if (vectorized) {
        const uint4* xv = reinterpret_cast<const uint4*>(x);
        const int num_vecs = vocab / VEC;
        const int per_part = (num_vecs + parts - 1) / parts;
        const int begin = part * per_part, end = min(num_vecs, begin + per_part);
        for (int base = begin + threadIdx.x; base < end; base += blockDim.x * ARGMAX_UNROLL) {
            uint4 raw[ARGMAX_UNROLL];
#pragma unroll
            for (int u = 0; u < ARGMAX_UNROLL; ++u) {
                const int v = base + u * blockDim.x;
                raw[u] = v < end ? load_fresh(xv + v) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < ARGMAX_UNROLL; ++u) {
                const int v = base + u * blockDim.x;
                if (v >= end) break;
                float f[VEC];
                unpack_vec(raw[u], f);
#pragma unroll
                for (int e = 0; e < VEC; ++e) keep_max(best, best_i, f[e], v * VEC + e);
            }
        }
        scalar_from = num_vecs * VEC;
    }
    // The elements outside whole vectors (a row's tail, or all of an unaligned row), cut the same way.
    const int per_part = (vocab - scalar_from + parts - 1) / parts;
    const int begin = scalar_from + part * per_part, end = min(vocab, begin + per_part);
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) keep_max(best, best_i, load_fresh(x + i), i);
    block_best<true>(best, best_i);
#if __CUDA_ARCH__ >= 900
    if (parts > 1) {   // parts = the cluster's CTAs, part = the cluster rank
        __shared__ float part_best;
        __shared__ int part_best_i;
        if (threadIdx.x == 0) {
            part_best = best;
            part_best_i = best_i;
        }
        cluster_sync();
        if (part == 0 && threadIdx.x == 0)
            for (int r = 1; r < parts; ++r) keep_max(best, best_i, load_cluster(&part_best, r), load_cluster_int(&part_best_i, r));
        cluster_sync();    // no CTA leaves while rank 0 may still read its shared memory
    }
#endif
    if (part == 0 && threadIdx.x == 0) out[blockIdx.x] = best_i == 0x7fffffff ? 0 : best_i;   // vocab 0: token 0
}
