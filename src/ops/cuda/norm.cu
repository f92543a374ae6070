// LayerNorm / RMSNorm forward and backward over the last dimension: the CUDA twins of
// src/ops/norm.rs (f64 statistics and per-element arithmetic as there; biased variance).
//
// Forward: one block per row. Backward: pocl_norm_backward_rows (one block per row) writes dx
// and each row's (mean, rstd); pocl_norm_backward_params (one thread per column) sums dw and db
// over the rows in row order (deterministic), written as the last two rows of the output
// [rows + 2, d], the layout the CPU op returns.

#include "common.cuh"

// (mean, 1/std) of row x; `center` = LayerNorm (RMSNorm: mean 0).
__device__ void row_stats(const float* x, int d, int center, double eps, double* sh,
                          double* mean, double* rstd) {
    double s = 0.0;
    if (center) {
        for (int i = threadIdx.x; i < d; i += blockDim.x) s += (double)x[i];
        s = block_sum(s, sh);
    }
    const double m = center ? s / d : 0.0;
    double v = 0.0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        double c = (double)x[i] - m;
        v += c * c;
    }
    v = block_sum(v, sh) / d;
    *mean = m;
    *rstd = 1.0 / sqrt(v + eps);
}

// y = (x - mean) * rstd * w (+ b); b may be absent (has_bias = 0).
extern "C" __global__ void pocl_norm_forward(const float* x, const float* w, const float* b,
                                             float* y, int d, int center, int has_bias,
                                             double eps) {
    __shared__ double sh[32];
    const long long r = blockIdx.x;
    const float* xr = x + r * d;
    float* yr = y + r * d;
    double mean, rstd;
    row_stats(xr, d, center, eps, sh, &mean, &rstd);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        double v = ((double)xr[i] - mean) * rstd * (double)w[i];
        yr[i] = (float)(v + (has_bias ? (double)b[i] : 0.0));
    }
}

// dx = rstd (g - mean(g) - x^ mean(g x^)), g = dy w, x^ = (x - mean) rstd (no mean(g) term
// for RMSNorm). stats[2r], stats[2r+1] = mean, rstd of row r, for the parameter kernel.
extern "C" __global__ void pocl_norm_backward_rows(const float* x, const float* w,
                                                   const float* dy, float* dx, double* stats,
                                                   int d, int center, double eps) {
    __shared__ double sh[32];
    const long long r = blockIdx.x;
    const float* xr = x + r * d;
    const float* gr = dy + r * d;
    float* dxr = dx + r * d;
    double mean, rstd;
    row_stats(xr, d, center, eps, sh, &mean, &rstd);
    double sg = 0.0, sgx = 0.0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        double xh = ((double)xr[i] - mean) * rstd;
        double g = (double)gr[i] * (double)w[i];
        sg += g;
        sgx += g * xh;
    }
    sg = block_sum(sg, sh);
    sgx = block_sum(sgx, sh);
    const double mg = center ? sg / d : 0.0, mgx = sgx / d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        double xh = ((double)xr[i] - mean) * rstd;
        double g = (double)gr[i] * (double)w[i];
        dxr[i] = (float)(rstd * (g - mg - xh * mgx));
    }
    if (threadIdx.x == 0) {
        stats[2 * r] = mean;
        stats[2 * r + 1] = rstd;
    }
}

// dw[i] = sum_r dy[r,i] x^[r,i], db[i] = sum_r dy[r,i], into out rows `rows` and `rows + 1`.
extern "C" __global__ void pocl_norm_backward_params(const float* x, const float* dy,
                                                     const double* stats, float* out,
                                                     long long rows, int d) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < d; i += gridDim.x * blockDim.x) {
        double dw = 0.0, db = 0.0;
        for (long long r = 0; r < rows; r++) {
            double g = (double)dy[r * d + i];
            dw += g * ((double)x[r * d + i] - stats[2 * r]) * stats[2 * r + 1];
            db += g;
        }
        out[rows * d + i] = (float)dw;
        out[(rows + 1) * d + i] = (float)db;
    }
}
