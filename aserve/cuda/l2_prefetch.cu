// Weights into L2 while HBM would otherwise idle. A decode step at batch 1 streams ~15 GB of
// weights through GEMVs at the copy ceiling, but between them run kernels that read almost
// nothing (RMSNorm, rotary and the KV write, the decode attention): ~13 us a layer of Llama-8B
// in which HBM moves no weights. This kernel, placed in the stream right after a GEMV, starts
// once that GEMV has finished (programmatic dependent launch), asks the TMA units to bring
// `bytes` of the next GEMV's weight into L2 (cp.async.bulk.prefetch: fire and forget, no
// registers or shared memory held) and exits; the small kernels then run while the bytes
// arrive, and the next GEMV finds its first rows in L2.
//
// Waiting first matters twice: started earlier, the prefetch would only compete with the GEMV
// still streaming; and a kernel that finished before the one ahead of it would let the kernel
// behind it (which waits for this one alone) read that GEMV's output too early.
#include "common.cuh"

// Before Hopper there is no bulk prefetch: the kernel only keeps the chain's order.
extern "C" __global__ void l2_prefetch(const char* __restrict__ base, i64 bytes, int chunk) {
    start_after_previous_kernel();
#if __CUDA_ARCH__ >= 900
    const i64 stride = (i64)gridDim.x * blockDim.x * chunk;
    for (i64 offset = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * chunk; offset < bytes; offset += stride) {
        // base is 16-byte aligned and bytes and chunk are multiples of 16 (l2_prefetch.py).
        const unsigned size = (unsigned)(bytes - offset < chunk ? bytes - offset : chunk);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(base + offset), "r"(size) : "memory");
    }
#endif
}
