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
// One variant folds a gated MLP's activation into its gate/up GEMV:
// - SILU_MUL: W is the merged [gate; up] matrix [2n, k], and out[m, i] = silu(g) * u for
//   g = x . W[i], u = x . W[n + i], each rounded as the unfused GEMV and silu_and_mul_vec
//   (layer_ops.cu) round them. A warp owns one output: its two weight rows are gate row i and
//   up row i, so it reads as many bytes as the plain GEMV's two rows, and the sums are bit for
//   bit the plain GEMV's (a row's sum depends only on the lane split of k, not on its partner).
//
// Compile-time configuration (-D, set by aserve/cuda/gemv.py): DTYPE, ROWS (M, so the
// accumulators are a fixed register array), WEIGHT_ROWS, UNROLL and SILU_MUL.
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
#ifndef SILU_MUL
#define SILU_MUL 0
#endif

// Threads per CTA at most, and the CTAs per SM that ptxas must leave room for: 128 registers a
// thread. With that budget it issues all of a step's W loads before the first FMA; asked for
// more occupancy (fewer registers), it sinks each load next to its use, and a warp then waits
// out one HBM round trip per load instead of one per step.
#define MAX_THREADS 128
#define MIN_CTAS_PER_SM 4

static_assert(ROWS * WEIGHT_ROWS <= 32, "each sum is stored by a lane of its own");
static_assert(!SILU_MUL || WEIGHT_ROWS == 2, "SILU_MUL pairs a gate row with an up row");
// Outputs per warp: a row of W each, or one (gate, up) pair under SILU_MUL.
#define OUTPUTS_PER_WARP (SILU_MUL ? 1 : WEIGHT_ROWS)

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

// The row of W that a warp's r-th weight row is, for a warp whose first output is `first`:
// consecutive rows, or gate row `first` and up row n + first under SILU_MUL. In the plain
// layout a warp's later rows may pass the end: they re-read the last row rather than branch,
// so the warp stays converged, and those sums are simply not stored. (Under SILU_MUL a warp
// has one output, first < n, and the clamp changes nothing.)
__device__ __forceinline__ i64 weight_row(int first, int r, int n) {
#if SILU_MUL
    return (i64)r * n + min(first, n - 1);
#else
    return min(first + r, n - 1);
#endif
}

// One step: UNROLL vectors per lane of each W row (32 * UNROLL per warp), the lane's first being
// vector `lane_vec`. GUARDED is the last, partial step: vectors past the row's end read as zero.
// first_step: the warp's first step: its W loads go out before the wait for the previous kernel
// (which wrote x), so under programmatic dependent launch they overlap that kernel's tail.
template <bool GUARDED>
__device__ __forceinline__ void accumulate(float (&acc)[WEIGHT_ROWS][ROWS], const uint4* const (&w)[WEIGHT_ROWS],
                                           const uint4* const (&xv)[ROWS], int lane_vec, int num_vecs,
                                           bool first_step) {
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
        unsigned token = 0;
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int r = 0; r < WEIGHT_ROWS; ++r) token ^= wv[u][r].x;
        start_after_loads_and_previous_kernel(token);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int v = lane_vec + 32 * u;
        float xf[ROWS][VEC];
#pragma unroll
        for (int m = 0; m < ROWS; ++m)
            unpack_vec((!GUARDED || v < num_vecs) ? load_x(xv[m] + v) : make_uint4(0, 0, 0, 0), xf[m]);
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
// warps of blockDim.x / 32 per CTA to give each OUTPUTS_PER_WARP outputs. SILU_MUL: out is
// [ROWS, n] of scalar_t, weight [2n, k] and bias [2n] (gate rows, then up rows).
// The plain layout's scalar_t output may go on through what a decode step does next with it,
// each op rounded as its own torch kernel would round it (bit for bit the unfused ops):
// outputs [0, scaled) times `scale` (OPT's query scaling), then ReLU when relu, then plus
// residual [ROWS, n] (rows residual_stride apart; null: none).
extern "C" __global__ void __launch_bounds__(MAX_THREADS, MIN_CTAS_PER_SM)
gemv(void* __restrict__ out, const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
     const scalar_t* __restrict__ bias, i64 x_stride, int n, int k, int out_float32,
     const scalar_t* residual, i64 residual_stride, int relu, int scaled, float scale) {
    const int lane = threadIdx.x % 32;
    const int first = (blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * OUTPUTS_PER_WARP;
    if (first >= n) {  // warp-uniform: the shuffles below see all 32 lanes or none
        start_after_previous_kernel();
        return;
    }
    const int num_vecs = k / VEC;
    const uint4* w[WEIGHT_ROWS];
#pragma unroll
    for (int r = 0; r < WEIGHT_ROWS; ++r)
        w[r] = reinterpret_cast<const uint4*>(weight + weight_row(first, r, n) * k);
    const uint4* xv[ROWS];
#pragma unroll
    for (int m = 0; m < ROWS; ++m) xv[m] = reinterpret_cast<const uint4*>(x + m * x_stride);

    float acc[WEIGHT_ROWS][ROWS];
#pragma unroll
    for (int r = 0; r < WEIGHT_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < ROWS; ++m) acc[r][m] = 0.f;

    // Steps are counted per warp (not per lane) so that only the last one needs bounds checks.
    // The first step is its own code, and its wait depends on its W loads' data
    // (start_after_loads_and_previous_kernel): with the wait behind a run-time "first step?"
    // test in the loop, ptxas issued 1 of the step's 8 W loads before the wait and 7 after it;
    // peeled but without that dependence, all 8 after it (tests/test_cuda_instruction_order.py).
    const int step = 32 * UNROLL;
    int base = 0;
    if (num_vecs >= step) {
        accumulate<false>(acc, w, xv, lane, num_vecs, true);
        base = step;
    }
    for (; base + step <= num_vecs; base += step)
        accumulate<false>(acc, w, xv, base + lane, num_vecs, false);
    if (base == 0 && num_vecs > 0) accumulate<true>(acc, w, xv, lane, num_vecs, true);   // one partial step
    else if (base < num_vecs) accumulate<true>(acc, w, xv, base + lane, num_vecs, false);
    else if (base == 0) start_after_previous_kernel();  // k == 0: nothing was loaded

#pragma unroll
    for (int r = 0; r < WEIGHT_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < ROWS; ++m)
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], o);

#if SILU_MUL
    // Every lane now holds every sum; lane m stores row m's output. Each term is rounded where
    // the unfused path rounds: the GEMV's outputs, then silu(g) (silu_and_mul_vec).
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
        if (lane != m) continue;
        float g = acc[0][m], u = acc[1][m];
        if (bias) {
            g += to_float(bias[first]);
            u += to_float(bias[n + first]);
        }
        g = round_dtype(g);
        u = round_dtype(u);
        static_cast<scalar_t*>(out)[(i64)m * n + first] = from_float(round_dtype(g / (1.f + expf(-g))) * u);
    }
#else
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
            if (out_float32) {
                static_cast<float*>(out)[at] = y;
                continue;
            }
            if (row < scaled) y = round_dtype(y) * scale;
            if (relu) {  // torch's clamp_min(0): NaN and -0 pass as they are
                y = round_dtype(y);
                if (y < 0.f) y = 0.f;
            }
            // Written by an earlier kernel of the step: a coherent load, after the wait.
            if (residual) y = load_fresh(residual + m * residual_stride + row) + round_dtype(y);
            static_cast<scalar_t*>(out)[at] = from_float(y);
        }
    }
#endif
}
