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

// The CTA's winning index over every thread's (best, best_i), for thread 0: across each warp
// with shuffles, then across the warps through shared memory. NAN_WINS: keep_max's order (a
// NaN wins), else keep_best's (a NaN never does). 0x7fffffff where no thread kept anything.
template <bool NAN_WINS>
__device__ __forceinline__ int block_best_index(float best, int best_i) {
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

// The argmax of each row of logits [rows, vocab] (greedy decoding), one CTA per row. torch's
// argmax reduces a lone 128k-token row in ~30 us on an H200 (bench/profile_step.py: a B1
// step's last kernel); here each thread keeps ARGMAX_UNROLL 16-byte loads in flight.
// vectorized: the rows start on 16-byte boundaries (else every element is loaded alone).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
argmax_rows(i64* __restrict__ out,                   // [rows]
            const scalar_t* __restrict__ logits,     // [rows, vocab], rows of row_stride
            i64 row_stride, int vocab, int vectorized) {
    const scalar_t* x = logits + blockIdx.x * row_stride;
    float best = NEG_INF;
    int best_i = 0x7fffffff;
    int scalar_from = 0;
    if (vectorized) {
        const uint4* xv = reinterpret_cast<const uint4*>(x);
        const int num_vecs = vocab / VEC;
        for (int base = threadIdx.x; base < num_vecs; base += blockDim.x * ARGMAX_UNROLL) {
            uint4 raw[ARGMAX_UNROLL];
#pragma unroll
            for (int u = 0; u < ARGMAX_UNROLL; ++u) {
                const int v = base + u * blockDim.x;
                raw[u] = v < num_vecs ? xv[v] : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < ARGMAX_UNROLL; ++u) {
                const int v = base + u * blockDim.x;
                if (v >= num_vecs) break;
                float f[VEC];
                unpack_vec(raw[u], f);
#pragma unroll
                for (int e = 0; e < VEC; ++e) keep_max(best, best_i, f[e], v * VEC + e);
            }
        }
        scalar_from = num_vecs * VEC;
    }
    for (int i = scalar_from + threadIdx.x; i < vocab; i += blockDim.x) keep_max(best, best_i, to_float(x[i]), i);
    const int winner = block_best_index<true>(best, best_i);
    if (threadIdx.x == 0) out[blockIdx.x] = winner == 0x7fffffff ? 0 : winner;   // vocab 0: token 0
}
