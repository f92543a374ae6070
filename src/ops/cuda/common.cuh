// Block reductions shared by pocl's kernels. Sums are in a fixed order for a given block size
// (warp shuffles, then the warps' partials in order), so results are deterministic run to run.
#pragma once

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
