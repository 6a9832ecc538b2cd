// Weight-streaming GEMV for decode-time linear layers: y[m, n] = x[m, :] . W[n, :] (+ bias[n])
// for a few rows of x (M = 1..4) and W [N, K] row-major (torch.nn.Linear's layout). At these
// sizes the matmul is a single pass over W, so its speed is the speed of reading W from HBM;
// cuBLAS reached about half the copy ceiling on an H100 for Llama-8B's o_proj at batch 1.
//
// Each warp owns WEIGHT_ROWS consecutive rows of W (outputs n) and walks K with 16-byte loads,
// lane i taking vectors i, i + 32, ... so each warp-wide load is 512 contiguous bytes; UNROLL
// such loads per W row are issued before any is used, which keeps enough bytes in flight to
// cover HBM latency. Partial sums stay in registers (fp32) and meet in a shuffle reduction.
// x is small (at most M * K elements) and every warp of the GPU reads it, so after the first
// touch it comes from L1/L2 (load_x), at no cost to the HBM stream.
//
// Two variants fold a decoder layer's residual add and RMSNorm into the GEMVs around them, so a
// batch-1 decode step launches no norm kernels (65 of them for Llama-8B, 0.22 ms a step):
// - NORM_INPUT: x is the residual stream; the CTA first normalizes its rows (Llama's RMSNorm,
//   rounded where the model rounds) into shared memory, and the GEMV reads x from there.
// - ADD_TO_OUT: out is the residual stream, and each output is added into it (out += y, both
//   rounded to the dtype as the model's own add): every element has one owner lane, so the
//   update in place races with nothing.
//
// Compile-time configuration (-D, set by aserve/cuda/gemv.py): DTYPE, ROWS (M, so the
// accumulators are a fixed register array), WEIGHT_ROWS, UNROLL, NORM_INPUT and ADD_TO_OUT.
#include "common.cuh"

#ifndef ROWS
#define ROWS 1
#endif
#ifndef WEIGHT_ROWS
#define WEIGHT_ROWS 2
#endif
#ifndef UNROLL
#define UNROLL 4
#endif
#ifndef NORM_INPUT
#define NORM_INPUT 0
#endif
#ifndef ADD_TO_OUT
#define ADD_TO_OUT 0
#endif

// Threads per CTA at most, and the CTAs per SM that ptxas must leave room for: 128 registers a
// thread. With that budget it issues all of a step's W loads before the first FMA; asked for
// more occupancy (fewer registers), it sinks each load next to its use, and a warp then waits
// out one HBM round trip per load instead of one per step.
#define MAX_THREADS 128
#define MIN_CTAS_PER_SM 4

static_assert(ROWS * WEIGHT_ROWS <= 32, "each sum is stored by a lane of its own");

// W is read exactly once and never written during a step: the non-coherent path, kept out of L1.
// volatile: without it NVVM moves each load down to its first use, serializing the step.
__device__ __forceinline__ uint4 load_weight(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// x, which the previous kernel wrote and may still have been writing when this one started
// (programmatic dependent launch): a plain, coherent load, which the memory model orders after
// the wait and which L1 still serves to the other warps of the SM. Not __ldg: the
// non-coherent path assumes x read-only for the whole kernel, and graph replays that read it
// so gave different bits on an H200; nor L2 only (load_fresh), which cost B1 0.3 ms a token.
// asm: a const __restrict__ pointer would let the compiler pick the non-coherent path itself.
__device__ __forceinline__ uint4 load_x(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// x as the GEMV reads it: from global memory, or the normalized rows in shared memory.
__device__ __forceinline__ uint4 load_input(const uint4* p) {
#if NORM_INPUT
    return *p;
#else
    return load_x(p);
#endif
}

// NORM_INPUT's prologue, run by every thread of the CTA after the wait for the previous kernel:
// each of the ROWS rows of the residual stream (k elements, x_stride apart) becomes
// norm_weight * (h * rsqrt(mean(h^2) + eps)).to(dtype), rounded, in `normed` (ROWS * k / VEC
// vectors of shared memory), as rms_norm_vec (layer_ops.cu) computes it. The stream is read
// through L2 only (load_fresh): earlier kernels of the step rewrote it in place, and an L1
// line of an older read must not serve it.
__device__ void normalize_rows(uint4* normed, const scalar_t* residual, i64 x_stride,
                               const scalar_t* norm_weight, float eps, int k) {
    __shared__ float partial[ROWS][MAX_THREADS / 32];
    __shared__ float inv_rms[ROWS];
    const int num_vecs = k / VEC, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int num_warps = blockDim.x / 32;
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
        const uint4* row = reinterpret_cast<const uint4*>(residual + m * x_stride);
        float squares = 0.f;
        for (int v = threadIdx.x; v < num_vecs; v += blockDim.x) {
            float h[VEC];
            unpack_vec(load_fresh(row + v), h);
#pragma unroll
            for (int e = 0; e < VEC; ++e) squares += h[e] * h[e];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) squares += __shfl_xor_sync(0xffffffffu, squares, o);
        if (lane == 0) partial[m][warp] = squares;
    }
    __syncthreads();
    if (threadIdx.x < ROWS) {
        float total = 0.f;
        for (int w = 0; w < num_warps; ++w) total += partial[threadIdx.x][w];
        inv_rms[threadIdx.x] = rsqrtf(total / k + eps);
    }
    __syncthreads();
    const uint4* weight = reinterpret_cast<const uint4*>(norm_weight);
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
        const uint4* row = reinterpret_cast<const uint4*>(residual + m * x_stride);
        const float inv = inv_rms[m];
        for (int v = threadIdx.x; v < num_vecs; v += blockDim.x) {
            float h[VEC], w[VEC];
            unpack_vec(load_fresh(row + v), h);
            unpack_vec(weight[v], w);
#pragma unroll
            for (int e = 0; e < VEC; ++e) h[e] = w[e] * to_float(from_float(h[e] * inv));
            normed[m * num_vecs + v] = pack_vec(h);
        }
    }
    __syncthreads();
}

struct NormArgs {  // NORM_INPUT's prologue inputs (unused otherwise)
    uint4* normed;
    const scalar_t* residual;
    i64 x_stride;
    const scalar_t* weight;
    float eps;
    int k;
};

// One step: UNROLL vectors per lane of each W row (32 * UNROLL per warp), the lane's first being
// vector `lane_vec`. GUARDED is the last, partial step: vectors past the row's end read as zero.
// first_step: the warp's first step: its W loads go out before the wait for the previous kernel
// (which wrote x), so under programmatic dependent launch they overlap that kernel's tail.
template <bool GUARDED>
__device__ __forceinline__ void accumulate(float (&acc)[WEIGHT_ROWS][ROWS], const uint4* const (&w)[WEIGHT_ROWS],
                                           const uint4* const (&xv)[ROWS], int lane_vec, int num_vecs,
                                           bool first_step, const NormArgs& norm) {
    // Every load of the step before any arithmetic: these are the loads that hide latency.
    uint4 wv[UNROLL][WEIGHT_ROWS];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int v = lane_vec + 32 * u;
#pragma unroll
        for (int r = 0; r < WEIGHT_ROWS; ++r)
            wv[u][r] = (!GUARDED || v < num_vecs) ? load_weight(w[r] + v) : make_uint4(0, 0, 0, 0);
    }
    if (first_step) {
        start_after_previous_kernel();
#if NORM_INPUT
        normalize_rows(norm.normed, norm.residual, norm.x_stride, norm.weight, norm.eps, norm.k);
#endif
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int v = lane_vec + 32 * u;
        float xf[ROWS][VEC];
#pragma unroll
        for (int m = 0; m < ROWS; ++m)
            unpack_vec((!GUARDED || v < num_vecs) ? load_input(xv[m] + v) : make_uint4(0, 0, 0, 0), xf[m]);
#pragma unroll
        for (int r = 0; r < WEIGHT_ROWS; ++r) {
            float wf[VEC];
            unpack_vec(wv[u][r], wf);
#pragma unroll
            for (int m = 0; m < ROWS; ++m)
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[r][m] = fmaf(wf[e], xf[m][e], acc[r][m]);
        }
    }
}

// out [ROWS, n] (scalar_t, or float when out_float32), x rows x_stride elements apart, weight
// [n, k] contiguous, bias [n] or null. k * sizeof(scalar_t) and x_stride * sizeof(scalar_t)
// are multiples of 16 and the pointers 16-byte aligned (the wrapper checks). Grid: enough
// warps of blockDim.x / 32 per CTA to give each WEIGHT_ROWS rows of W. NORM_INPUT: x is the
// residual stream, norm_weight [k] and eps its RMSNorm's, and the launch gives ROWS * k
// elements of dynamic shared memory. ADD_TO_OUT: out [ROWS, n] is the residual stream.
extern "C" __global__ void __launch_bounds__(MAX_THREADS, MIN_CTAS_PER_SM)
gemv(void* __restrict__ out, const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
     const scalar_t* __restrict__ bias, i64 x_stride, int n, int k, int out_float32,
     const scalar_t* __restrict__ norm_weight, float eps) {
    extern __shared__ uint4 normed[];
    const NormArgs norm{normed, x, x_stride, norm_weight, eps, k};
    const int lane = threadIdx.x % 32;
    const int first = (blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * WEIGHT_ROWS;
    if (first >= n) {  // warp-uniform: the shuffles below see all 32 lanes or none
        start_after_previous_kernel();
#if NORM_INPUT
        normalize_rows(normed, x, x_stride, norm_weight, eps, k);  // its barriers count every warp
#endif
        return;
    }
    const int num_vecs = k / VEC;
    // Rows past the end re-read the last row rather than branch: the warp stays converged and
    // those sums are simply not stored.
    const uint4* w[WEIGHT_ROWS];
#pragma unroll
    for (int r = 0; r < WEIGHT_ROWS; ++r)
        w[r] = reinterpret_cast<const uint4*>(weight + (i64)min(first + r, n - 1) * k);
    const uint4* xv[ROWS];
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
        xv[m] = NORM_INPUT ? normed + m * num_vecs : reinterpret_cast<const uint4*>(x + m * x_stride);

    float acc[WEIGHT_ROWS][ROWS];
#pragma unroll
    for (int r = 0; r < WEIGHT_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < ROWS; ++m) acc[r][m] = 0.f;

    // Steps are counted per warp (not per lane) so that only the last one needs bounds checks.
    const int step = 32 * UNROLL;
    int base = 0;
    for (; base + step <= num_vecs; base += step)
        accumulate<false>(acc, w, xv, base + lane, num_vecs, base == 0, norm);
    if (base < num_vecs) accumulate<true>(acc, w, xv, base + lane, num_vecs, base == 0, norm);
    else if (base == 0) start_after_previous_kernel();  // k == 0: nothing was loaded (never NORM_INPUT)

#pragma unroll
    for (int r = 0; r < WEIGHT_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < ROWS; ++m)
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], o);

    // Every lane now holds every sum; lane r * ROWS + m stores (r, m), so the stores go out in
    // parallel, each picked by a compile-time index (a run-time index would put acc in local memory).
#pragma unroll
    for (int r = 0; r < WEIGHT_ROWS; ++r) {
        const int row = first + r;
#pragma unroll
        for (int m = 0; m < ROWS; ++m) {
            if (lane != r * ROWS + m || row >= n) continue;
            float y = acc[r][m];
            if (bias) y += to_float(bias[row]);
            const i64 at = (i64)m * n + row;
#if ADD_TO_OUT
            scalar_t* residual = static_cast<scalar_t*>(out) + at;
            *residual = from_float(load_fresh(residual) + to_float(from_float(y)));
#else
            if (out_float32) static_cast<float*>(out)[at] = y;
            else static_cast<scalar_t*>(out)[at] = from_float(y);
#endif
        }
    }
}
