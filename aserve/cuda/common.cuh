// Shared by every aserve kernel: the element type chosen at compile time and 16-byte vector
// loads and stores of it. No CUDA headers are included, so NVRTC needs no include path: half
// and bfloat16 travel as raw 16-bit words and are converted with PTX.
//
// DTYPE (set with -D by aserve/cuda/ops.py): 0 float32, 1 float16, 2 bfloat16.
#pragma once

typedef unsigned short u16;
typedef long long i64;

#ifndef DTYPE
#define DTYPE 1
#endif

#if DTYPE == 0
typedef float scalar_t;
#define VEC 4           // elements in one 16-byte vector
#else
typedef u16 scalar_t;
#define VEC 8
#endif

__device__ __forceinline__ float to_float(float x) { return x; }

__device__ __forceinline__ float to_float(u16 x) {
#if DTYPE == 1
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
#else
    return __uint_as_float(((unsigned)x) << 16);
#endif
}

__device__ __forceinline__ scalar_t from_float(float f) {
#if DTYPE == 0
    return f;
#elif DTYPE == 1
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

// Rounds a float through the model dtype, as an intermediate torch tensor of that dtype would.
__device__ __forceinline__ float round_dtype(float x) { return to_float(from_float(x)); }

// A 16-byte vector of VEC elements as floats.
__device__ __forceinline__ void unpack_vec(const uint4 raw, float* out) {
#if DTYPE == 0
    out[0] = __uint_as_float(raw.x); out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z); out[3] = __uint_as_float(raw.w);
#else
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = to_float((u16)(words[i] & 0xffffu));
        out[2 * i + 1] = to_float((u16)(words[i] >> 16));
    }
#endif
}

// VEC consecutive elements (16 bytes, which must be 16-byte aligned) as floats.
__device__ __forceinline__ void load_vec(const scalar_t* p, float* out) {
    unpack_vec(*reinterpret_cast<const uint4*>(p), out);
}

// VEC floats rounded to the element type, as one 16-byte vector.
__device__ __forceinline__ uint4 pack_vec(const float* in) {
#if DTYPE == 0
    return make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]), __float_as_uint(in[3]));
#else
    unsigned words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
        words[i] = (unsigned)from_float(in[2 * i]) | ((unsigned)from_float(in[2 * i + 1]) << 16);
    return make_uint4(words[0], words[1], words[2], words[3]);
#endif
}

// Loads of what an earlier kernel of the step wrote, through L2 only. Under programmatic
// dependent launch a kernel starts before the kernel that writes its input has finished, so
// that input is not read-only for the kernel's lifetime, as the non-coherent path (__ldg, and
// the compiler's own choice for const __restrict__ pointers) assumes; graph replays of a
// decode chain that read it that way gave different bits run to run on an H200.
__device__ __forceinline__ uint4 load_fresh(const uint4* p) { return __ldcg(p); }
__device__ __forceinline__ float load_fresh(const scalar_t* p) { return to_float(__ldcg(p)); }

// Programmatic dependent launch (aserve/cuda/compiler.py launches with pdl=True). Such a kernel
// may start while the previous kernel of its stream still runs: before this wait it may only
// read what no kernel of the step writes (weights), or what was written before the step's
// first kernel started (the step's inputs: positions, slots, sequence lengths, block tables;
// the KV cache of earlier steps), through L2; after it, the previous kernel has finished and
// its writes are visible. The second holds because every kernel launched with pdl=True lets the
// next one start (allow_next_kernel) only after its own wait, on every path, and no CTA exits
// before its wait: so when a kernel starts, every kernel before the previous one has finished
// and the step's first kernel (a torch kernel, or a graph's first node) started after its
// inputs were written. Every kernel launched with pdl=True calls it on every path that touches
// memory; before Hopper, or without the launch attribute, it returns at once.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel of the stream be scheduled once every CTA of this one has called this
// (or exited), so its CTAs move into SMs as this kernel's last ones drain (a GEMV's start
// streaming their weights). It orders nothing: the next kernel still waits for this one to
// finish before it reads its output. Called right after the wait: calling it first thing
// instead (a chain of kernels resident ahead) measured no faster for B1 on an H200.
__device__ __forceinline__ void allow_next_kernel() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Both at once, for kernels with nothing to do before their inputs are ready.
__device__ __forceinline__ void start_after_previous_kernel() {
    wait_for_previous_kernel();
    allow_next_kernel();
}

// start_after_previous_kernel for a kernel that loads something first (weights, step inputs):
// `token` is made from every such load's data, and the wait depends on it (one predicated wait
// on each side of a test of it), so those loads are issued, and back, before the wait. ptxas
// otherwise moves loads written before the wait below it (moving a load later is always legal),
// and the previous kernel's run time no longer hides their latency.
__device__ __forceinline__ void start_after_loads_and_previous_kernel(unsigned token) {
#if __CUDA_ARCH__ >= 900
    asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.u32 p, %0, 0;\n\t"
                 "@p griddepcontrol.wait;\n\t@!p griddepcontrol.wait;\n\t}" ::"r"(token) : "memory");
#endif
    allow_next_kernel();
}
