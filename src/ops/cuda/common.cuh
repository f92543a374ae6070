// Block reductions shared by pocl's kernels. Sums are in a fixed order for a given block size
// (warp shuffles, then the warps' partials in order), so results are deterministic run to run.
#pragma once

#ifdef POCL_HOST_EMULATION
// The kernels compiled as plain C++ for the host with ONE thread per block, so that a CPU test
// (tests/cuda_host_emulation.rs) runs their exact per-row code without a GPU: the block
// reductions become the identity and __syncthreads a no-op. Only the reductions and the thread
// striding are not exercised this way.
#include <math.h>
struct PoclDim3 {
    unsigned int x, y, z;
};
static PoclDim3 threadIdx = {0, 0, 0}, blockDim = {1, 1, 1}, blockIdx = {0, 0, 0},
                gridDim = {1, 1, 1};
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
static inline void __syncthreads() {}
static inline double block_sum(double x, double*) { return x; }
static inline float block_max(float x, float*) { return x; }
#else

__device__ __forceinline__ double warp_sum(double x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_down_sync(0xffffffffu, x, o));
    return x;
}

// Sum of x over the block; every thread gets the result. `sh` holds >= 32 doubles. blockDim.x
// must be a multiple of 32 (the launchers use 256 or 512).
__device__ double block_sum(double x, double* sh) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    x = warp_sum(x);
    __syncthreads();  // the previous call's readers of sh[0] are done
    if (lane == 0) sh[wid] = x;
    __syncthreads();
    if (wid == 0) {
        x = lane < nw ? sh[lane] : 0.0;
        x = warp_sum(x);
        if (lane == 0) sh[0] = x;
    }
    __syncthreads();
    return sh[0];
}

// Max of x over the block (NaN elements are ignored by fmaxf, as the CPU's max ignores them).
__device__ float block_max(float x, float* sh) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    x = warp_max(x);
    __syncthreads();
    if (lane == 0) sh[wid] = x;
    __syncthreads();
    if (wid == 0) {
        x = lane < nw ? sh[lane] : -INFINITY;
        x = warp_max(x);
        if (lane == 0) sh[0] = x;
    }
    __syncthreads();
    return sh[0];
}
#endif  // POCL_HOST_EMULATION
