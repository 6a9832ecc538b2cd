// Fused layer kernels: each replaces a chain of small torch ops (one launch and one pass over
// the data instead of several), which is most of a decode step's non-matmul GPU time. Each
// rounds where the Hugging Face implementation rounds (to the model dtype between ops), so
// outputs match the reference up to reduction order.
//
// Compile-time configuration (-D, set by aserve/cuda/fused.py): DTYPE.
#include "common.cuh"

#define MAX_THREADS 1024

__device__ float block_sum(float v) {
    __shared__ float partial[MAX_THREADS / 32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int num_warps = (blockDim.x + 31) / 32;
    v = threadIdx.x < num_warps ? partial[threadIdx.x] : 0.f;
    if (warp == 0) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) partial[0] = v;
    }
    __syncthreads();
    return partial[0];
}

// 16-byte vectors of a row each thread of rms_norm_vec keeps in registers between its passes.
#define RMS_VECS 4

// rms_norm (below) in 16-byte vectors, for rows of a multiple of VEC elements on 16-byte
// boundaries, at most RMS_VECS * blockDim.x vectors: every load of a thread is in flight at
// once, so a decode step's row costs one memory round trip instead of one per element. The
// weight is a parameter no kernel of a step writes: its loads go out before the wait for the
// previous kernel (as layer_norm_vec's), so the row's loads, from L2, are the only round trip
// after it (the weight's 8 KB a layer likely come from HBM: a step's 16 GB of weights pass
// through the 50 MB L2 between two reads of it).
extern "C" __global__ void rms_norm_vec(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                        scalar_t* __restrict__ residual, const scalar_t* __restrict__ weight,
                                        i64 x_stride, i64 residual_stride, i64 out_stride, int hidden, float eps) {
    const int vectors = hidden / VEC;
    const uint4* w = reinterpret_cast<const uint4*>(weight);
    uint4 h_raw[RMS_VECS], w_raw[RMS_VECS];
#pragma unroll
    for (int j = 0; j < RMS_VECS; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v >= vectors) break;
        w_raw[j] = w[v];
    }
    start_after_previous_kernel();
    const uint4* row = reinterpret_cast<const uint4*>(x + blockIdx.x * x_stride);
    uint4* res = residual ? reinterpret_cast<uint4*>(residual + blockIdx.x * residual_stride) : nullptr;
    // Every load of the row and the residual, then the arithmetic: loads issued back to back
    // cost one round trip to L2, where a load issued after the previous vector's arithmetic
    // (which waits for that vector's data) costs one each.
    uint4 r_raw[RMS_VECS];
#pragma unroll
    for (int j = 0; j < RMS_VECS; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v >= vectors) break;
        h_raw[j] = load_fresh(row + v);
        if (res) r_raw[j] = load_fresh(res + v);
    }
    float squares = 0.f;
#pragma unroll
    for (int j = 0; j < RMS_VECS; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v >= vectors) break;
        float h[VEC];
        unpack_vec(h_raw[j], h);
        if (res) {
            float r[VEC];
            unpack_vec(r_raw[j], r);
#pragma unroll
            for (int i = 0; i < VEC; ++i) h[i] += r[i];
            h_raw[j] = pack_vec(h);                 // rounded to the dtype, as the model's add
            res[v] = h_raw[j];
            unpack_vec(h_raw[j], h);
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) squares += h[i] * h[i];
    }
    const float inv_rms = rsqrtf(block_sum(squares) / hidden + eps);
    uint4* dst = reinterpret_cast<uint4*>(out + blockIdx.x * out_stride);
#pragma unroll
    for (int j = 0; j < RMS_VECS; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v >= vectors) break;
        float h[VEC], wf[VEC], o[VEC];
        unpack_vec(h_raw[j], h);
        unpack_vec(w_raw[j], wf);
#pragma unroll
        for (int i = 0; i < VEC; ++i) o[i] = wf[i] * round_dtype(h[i] * inv_rms);
        dst[v] = pack_vec(o);
    }
}

// Llama's RMSNorm, one CTA per row: weight * (h * rsqrt(mean(h^2) + eps)).to(dtype), where
// h = x, or, with a residual, h = residual + x (rounded to the dtype, as the model's own add),
// which is also stored back into the residual: the decoder layer's add and norm in one pass.
extern "C" __global__ void rms_norm(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                    scalar_t* __restrict__ residual, const scalar_t* __restrict__ weight,
                                    i64 x_stride, i64 residual_stride, i64 out_stride, int hidden, float eps) {
    start_after_previous_kernel();
    const scalar_t* row = x + blockIdx.x * x_stride;
    scalar_t* res = residual ? residual + blockIdx.x * residual_stride : nullptr;
    float squares = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = load_fresh(row + i);
        if (res) {
            v = round_dtype(load_fresh(res + i) + v);
            res[i] = from_float(v);
        }
        squares += v * v;
    }
    const float inv_rms = rsqrtf(block_sum(squares) / hidden + eps);
    scalar_t* dst = out + blockIdx.x * out_stride;
    // Each thread re-reads only the elements it wrote above: no barrier needed.
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = res ? load_fresh(res + i) : load_fresh(row + i);
        dst[i] = from_float(to_float(weight[i]) * round_dtype(v * inv_rms));
    }
}

// LayerNorm (OPT, GPT-2) in 16-byte vectors, one CTA per row, for rows of a multiple of VEC
// elements on 16-byte boundaries and at most RMS_VECS * blockDim.x vectors:
// (x - mean) * rsqrt(var + eps) * weight + bias in float32, rounded once, as torch's kernel
// computes it (the variance biased, taken around the mean in a second pass over registers).
// weight and bias (either may be null: no affine, no bias) are parameters no kernel of a step
// writes, so their loads go out before the wait for the previous kernel. Its point is that it
// takes part in programmatic dependent launch (torch's LayerNorm does not): the kernels on
// either side of it overlap its launch, and the GEMV after it starts streaming its weights.
extern "C" __global__ void layer_norm_vec(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                                          i64 x_stride, i64 out_stride, int hidden, float eps) {
    const int vectors = hidden / VEC;
    const uint4* w = reinterpret_cast<const uint4*>(weight);
    const uint4* b = reinterpret_cast<const uint4*>(bias);
    uint4 w_raw[RMS_VECS], b_raw[RMS_VECS], h_raw[RMS_VECS];
#pragma unroll
    for (int j = 0; j < RMS_VECS; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v >= vectors) break;
        if (w) w_raw[j] = w[v];
        if (b) b_raw[j] = b[v];
    }
    start_after_previous_kernel();
    const uint4* row = reinterpret_cast<const uint4*>(x + blockIdx.x * x_stride);
    // Every load of the row, then the arithmetic (one round trip to L2; rms_norm_vec says why).
#pragma unroll
    for (int j = 0; j < RMS_VECS; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v >= vectors) break;
        h_raw[j] = load_fresh(row + v);
    }
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < RMS_VECS; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v >= vectors) break;
        float h[VEC];
        unpack_vec(h_raw[j], h);
#pragma unroll
        for (int i = 0; i < VEC; ++i) sum += h[i];
    }
    const float mean = block_sum(sum) / hidden;
    float deviations = 0.f;
#pragma unroll
    for (int j = 0; j < RMS_VECS; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v >= vectors) break;
        float h[VEC];
        unpack_vec(h_raw[j], h);
#pragma unroll
        for (int i = 0; i < VEC; ++i) deviations += (h[i] - mean) * (h[i] - mean);
    }
    __syncthreads();  // block_sum's shared partials are about to be reused
    const float inv_std = rsqrtf(block_sum(deviations) / hidden + eps);
    uint4* dst = reinterpret_cast<uint4*>(out + blockIdx.x * out_stride);
#pragma unroll
    for (int j = 0; j < RMS_VECS; ++j) {
        const int v = threadIdx.x + j * blockDim.x;
        if (v >= vectors) break;
        float h[VEC], wf[VEC], bf[VEC], o[VEC];
        unpack_vec(h_raw[j], h);
        if (w) unpack_vec(w_raw[j], wf);
        if (b) unpack_vec(b_raw[j], bf);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            o[i] = inv_std * (h[i] - mean);
            if (w) o[i] *= wf[i];
            if (b) o[i] += bf[i];
        }
        dst[v] = pack_vec(o);
    }
}

// layer_norm_vec for any row width: element by element, reading the row three times (from
// L1/L2 after the first).
extern "C" __global__ void layer_norm(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                                      i64 x_stride, i64 out_stride, int hidden, float eps) {
    start_after_previous_kernel();
    const scalar_t* row = x + blockIdx.x * x_stride;
    float sum = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) sum += load_fresh(row + i);
    const float mean = block_sum(sum) / hidden;
    float deviations = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float d = load_fresh(row + i) - mean;
        deviations += d * d;
    }
    __syncthreads();  // block_sum's shared partials are about to be reused
    const float inv_std = rsqrtf(block_sum(deviations) / hidden + eps);
    scalar_t* dst = out + blockIdx.x * out_stride;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float o = inv_std * (load_fresh(row + i) - mean);
        if (weight) o *= to_float(weight[i]);
        if (bias) o += to_float(bias[i]);
        dst[i] = from_float(o);
    }
}

// One rotated pair: x * cos + rotate_half(x) * sin, each product rounded as its own tensor
// would be; c and s are already rounded to the dtype.
__device__ __forceinline__ void rotate_pair(float x1, float x2, float c, float s, float& o1, float& o2) {
    o1 = round_dtype(x1 * c) + round_dtype(-x2 * s);
    o2 = round_dtype(x2 * c) + round_dtype(x1 * s);
}

// Rotary embedding in place (rotate-half form, as HF's Llama): per token, every query and key
// head's pairs (i, i + half) rotate by the angle of the token's position. cos/sin tables are
// float32 [max_position, head_dim]; HF casts them to the model dtype first, and so does this.
extern "C" __global__ void rotary_embedding(scalar_t* __restrict__ query, scalar_t* __restrict__ key,
                                            const i64* __restrict__ positions,
                                            const float* __restrict__ cos_cache,
                                            const float* __restrict__ sin_cache,
                                            i64 q_stride, i64 k_stride, int num_heads, int num_kv_heads,
                                            int head_dim) {
    start_after_previous_kernel();
    const int token = blockIdx.x;
    const int half = head_dim / 2;
    const i64 pos = positions[token];
    const float* cos_row = cos_cache + pos * head_dim;
    const float* sin_row = sin_cache + pos * head_dim;
    for (int idx = threadIdx.x; idx < (num_heads + num_kv_heads) * half; idx += blockDim.x) {
        const int head = idx / half, i = idx % half;
        scalar_t* x = head < num_heads ? query + token * q_stride + (i64)head * head_dim
                                       : key + token * k_stride + (i64)(head - num_heads) * head_dim;
        const float c = round_dtype(cos_row[i]), s = round_dtype(sin_row[i]);
        float o1, o2;
        rotate_pair(load_fresh(x + i), load_fresh(x + i + half), c, s, o1, o2);
        x[i] = from_float(o1);
        x[i + half] = from_float(o2);
    }
}

// rotary_embedding (above) in 16-byte vectors, for a half head size that is a multiple of VEC
// and rows on 16-byte boundaries: each thread rotates VEC pairs with one load of each half.
// Given a slot mapping it also does reshape_and_cache's work (cache_ops.cu) in the same launch,
// one fewer a layer: the rotated key heads and the value heads go to the token's cache slot.
// A negative slot (a padding token of a CUDA-graph batch), or no slot mapping (null: rotation
// only), stores nothing. A cache row (slot) is num_kv_heads * head_dim elements; value rows are
// v_stride elements apart (a view into the fused qkv output).
extern "C" __global__ void rotary_embedding_cache_vec(scalar_t* __restrict__ query, scalar_t* __restrict__ key,
                                                      const scalar_t* __restrict__ value,
                                                      scalar_t* __restrict__ k_cache, scalar_t* __restrict__ v_cache,
                                                      const i64* __restrict__ slot_mapping,
                                                      const i64* __restrict__ positions,
                                                      const float* __restrict__ cos_cache,
                                                      const float* __restrict__ sin_cache,
                                                      i64 q_stride, i64 k_stride, i64 v_stride,
                                                      int num_heads, int num_kv_heads, int head_dim) {
    // Before the wait for the previous kernel (the QKV projection): the token's position and
    // slot (step inputs, written before the step's first kernel: common.cuh) and this thread's
    // first cos/sin values, so that after it only the projection's output is waited for (at B1,
    // two dependent round trips fewer a layer).
    const int token = blockIdx.x;
    const int half = head_dim / 2, half_vecs = half / VEC;
    const i64 pos = __ldcg(positions + token);
    const i64 slot = slot_mapping != nullptr ? __ldcg(slot_mapping + token) : -1;
    const i64 cache_row = (i64)num_kv_heads * head_dim;
    const float* cos_row = cos_cache + pos * head_dim;
    const float* sin_row = sin_cache + pos * head_dim;
    // Every item of a thread has the same pairs when blockDim.x is a multiple of half_vecs (as
    // the launcher's multiples of 32 are for the usual head sizes); others reload theirs.
    const int first_i = (threadIdx.x % half_vecs) * VEC;
    float first_c[VEC], first_s[VEC];
    unsigned loaded = (unsigned)slot;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        first_c[k] = round_dtype(cos_row[first_i + k]);
        first_s[k] = round_dtype(sin_row[first_i + k]);
        loaded ^= __float_as_uint(first_c[k]) ^ __float_as_uint(first_s[k]);
    }
    start_after_loads_and_previous_kernel(loaded);

    // The value row's first vectors load beside the query and key heads, not after their stores.
    const int value_vecs = (int)(cache_row / VEC);
    const uint4* v = reinterpret_cast<const uint4*>(value + token * v_stride);
    const bool copy_first_value = slot >= 0 && (int)threadIdx.x < value_vecs;
    uint4 first_value;
    if (copy_first_value) first_value = load_fresh(v + threadIdx.x);
    for (int idx = threadIdx.x; idx < (num_heads + num_kv_heads) * half_vecs; idx += blockDim.x) {
        const int head = idx / half_vecs, i = (idx % half_vecs) * VEC;
        const bool is_key = head >= num_heads;
        scalar_t* x = is_key ? key + token * k_stride + (i64)(head - num_heads) * head_dim
                             : query + token * q_stride + (i64)head * head_dim;
        float x1[VEC], x2[VEC], o1[VEC], o2[VEC];
        unpack_vec(load_fresh(reinterpret_cast<const uint4*>(x + i)), x1);
        unpack_vec(load_fresh(reinterpret_cast<const uint4*>(x + i + half)), x2);
        const bool same = i == first_i;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const float c = same ? first_c[k] : round_dtype(cos_row[i + k]);
            const float s = same ? first_s[k] : round_dtype(sin_row[i + k]);
            rotate_pair(x1[k], x2[k], c, s, o1[k], o2[k]);
        }
        const uint4 r1 = pack_vec(o1), r2 = pack_vec(o2);
        *reinterpret_cast<uint4*>(x + i) = r1;
        *reinterpret_cast<uint4*>(x + i + half) = r2;
        if (is_key && slot >= 0) {
            scalar_t* dst = k_cache + slot * cache_row + (i64)(head - num_heads) * head_dim;
            *reinterpret_cast<uint4*>(dst + i) = r1;
            *reinterpret_cast<uint4*>(dst + i + half) = r2;
        }
    }
    if (slot < 0) return;
    uint4* vd = reinterpret_cast<uint4*>(v_cache + slot * cache_row);
    if (copy_first_value) vd[threadIdx.x] = first_value;
    for (int u = threadIdx.x + blockDim.x; u < value_vecs; u += blockDim.x) vd[u] = load_fresh(v + u);
}

// silu_and_mul (below) in 16-byte vectors, for d a multiple of VEC and rows on 16-byte
// boundaries; grid (tokens, column chunks), one vector of gate and up per thread and pass.
extern "C" __global__ void silu_and_mul_vec(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                            i64 x_stride, i64 out_stride, int d) {
    start_after_previous_kernel();
    const uint4* gate = reinterpret_cast<const uint4*>(x + blockIdx.x * x_stride);
    const uint4* up = reinterpret_cast<const uint4*>(x + blockIdx.x * x_stride + d);
    uint4* dst = reinterpret_cast<uint4*>(out + blockIdx.x * out_stride);
    for (int v = blockIdx.y * blockDim.x + threadIdx.x; v < d / VEC; v += gridDim.y * blockDim.x) {
        float g[VEC], u[VEC], o[VEC];
        unpack_vec(load_fresh(gate + v), g);
        unpack_vec(load_fresh(up + v), u);
#pragma unroll
        for (int i = 0; i < VEC; ++i) o[i] = round_dtype(g[i] / (1.f + expf(-g[i]))) * u[i];
        dst[v] = pack_vec(o);
    }
}

// silu(x[:, :d]) * x[:, d:] for the fused gate/up projection; grid (tokens, column chunks).
extern "C" __global__ void silu_and_mul(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                        i64 x_stride, i64 out_stride, int d) {
    start_after_previous_kernel();
    const scalar_t* row = x + blockIdx.x * x_stride;
    scalar_t* dst = out + blockIdx.x * out_stride;
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < d; i += gridDim.y * blockDim.x) {
        const float g = load_fresh(row + i);
        const float activated = round_dtype(g / (1.f + expf(-g)));
        dst[i] = from_float(activated * load_fresh(row + d + i));
    }
}
