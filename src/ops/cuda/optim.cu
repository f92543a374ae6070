// AdamW and the global gradient norm over flat f32 buffers: the CUDA twins of
// src/train/optim.rs (`adamw_chunk`, `sum_squares`), f64 arithmetic per element as there.
//
// The update is split in two kernels so that each writes only its own (mutable) operand:
// pocl_adamw_moments updates m and v (one [2, n] buffer) from the gradient, pocl_adamw_apply
// then updates the parameter from them. The CPU computes the step from the f64 moments before
// they are rounded to f32; here the second kernel reads the rounded f32 moments: the step
// differs by at most ~1 f32 ulp of m and v (relative ~1e-7).

#include "common.cuh"

// mv [2, n]: m then v. g may be absent (has_grad = 0): a zero gradient.
extern "C" __global__ void pocl_adamw_moments(float* mv, const float* g, long long n,
                                              int has_grad, double b1, double b2,
                                              double scale) {
    float* m = mv;
    float* v = mv + n;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        double gi = 0.0;
        if (has_grad) {
            // The clip multiplies the gradient and rounds it to f32, as torch's in-place clip.
            gi = scale < 1.0 ? (double)(float)((double)g[i] * scale) : (double)g[i];
        }
        double mi = b1 * (double)m[i] + (1.0 - b1) * gi;
        double vi = b2 * (double)v[i] + (1.0 - b2) * gi * gi;
        m[i] = (float)mi;
        v[i] = (float)vi;
    }
}

extern "C" __global__ void pocl_adamw_apply(float* p, const float* mv, long long n, double bc1,
                                            double bc2, double eps, double lr, double decay) {
    const float* m = mv;
    const float* v = mv + n;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        double denom = sqrt((double)v[i] / bc2) + eps;
        p[i] = (float)((double)p[i] * decay - lr * ((double)m[i] / bc1) / denom);
    }
}

// Per-block partial sums of x^2 in f64 over a fixed grid; the host adds the partials in order,
// so the norm is the same on every run.
extern "C" __global__ void pocl_sum_squares(const float* x, long long n, double* partial) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        double xi = (double)x[i];
        acc += xi * xi;
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
