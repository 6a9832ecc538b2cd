// Thread block clusters (Hopper and newer): CTAs of a cluster run at once on one GPU processing
// cluster and can read each other's shared memory. Kernels launched by aserve/cuda/compiler.py
// with cluster_z > 1 form clusters of 1 x 1 x cluster_z CTAs. Only for sm_90 and newer builds.
#pragma once

// CTAs in this CTA's cluster (1 when launched without clusters).
__device__ __forceinline__ int cluster_size() {
    unsigned n;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
    return (int)n;
}
// This CTA's rank in its cluster: blockIdx.z % cluster_size() for ops.py's 1 x 1 x n clusters.
__device__ __forceinline__ int cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return (int)r;
}
// Every thread of every CTA of the cluster: shared-memory writes before it are visible to the
// whole cluster after it (release and acquire at cluster scope).
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n"
                 "barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// The float at the shared-memory address of `local` in the CTA of cluster rank `rank`. volatile
// keeps it after the cluster barrier; no memory clobber, so a run of them issues back to back.
__device__ __forceinline__ float load_cluster(const float* local, int rank) {
    const unsigned address = (unsigned)__cvta_generic_to_shared(local);
    unsigned remote;
    float value;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(address), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(value) : "r"(remote));
    return value;
}
// The int at the shared-memory address of `local` in the CTA of cluster rank `rank`: its bits,
// moved by load_cluster (a load changes no bit of what it moves).
__device__ __forceinline__ int load_cluster_int(const int* local, int rank) {
    return __float_as_int(load_cluster(reinterpret_cast<const float*>(local), rank));
}
