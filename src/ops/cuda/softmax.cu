// The attention softmax with its scale and additive bias, forward and backward: the CUDA twin of
// src/ops/softmax.rs (softmax_forward_row / softmax_backward_row; f32 as there, the backward's
// dot product in f64). One block per row of scores.
//
// Rows are (batch, head, query) of scores [b, h, tq, tk]; the bias [b, 1, tq, tk] is shared by
// the heads: row r uses bias row (r / (h tq)) tq + r % tq.

#include "common.cuh"

// p = softmax(s * scale + bias) over each row, written to p.
extern "C" __global__ void pocl_softmax_forward(const float* s, const float* bias, float* p,
                                                int tk, int heads, int tq, float scale) {
    __shared__ float shf[32];
    __shared__ double shd[32];
    const long long r = blockIdx.x;
    const long long br = (r / ((long long)heads * tq)) * tq + r % tq;
    const float* sr = s + r * tk;
    const float* bb = bias + br * tk;
    float* pr = p + r * tk;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) m = fmaxf(m, sr[j] * scale + bb[j]);
    m = block_max(m, shf);
    double z = 0.0;  // f32 on the CPU, in 16 lanes; f64 here costs nothing and loses nothing
    for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        float e = expf(sr[j] * scale + bb[j] - m);
        pr[j] = e;
        z += (double)e;
    }
    z = block_sum(z, shd);
    const float inv = (float)(1.0 / z);
    for (int j = threadIdx.x; j < tk; j += blockDim.x) pr[j] *= inv;
}

// ds = scale * p * (dp - sum_k p_k dp_k), the gradient w.r.t. the unscaled scores.
extern "C" __global__ void pocl_softmax_backward(const float* p, const float* dp, float* ds,
                                                 int tk, float scale) {
    __shared__ double sh[32];
    const long long r = blockIdx.x;
    const float* pr = p + r * tk;
    const float* gr = dp + r * tk;
    float* dr = ds + r * tk;
    double dot = 0.0;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) dot += (double)pr[j] * (double)gr[j];
    const float d = (float)block_sum(dot, sh);
    for (int j = threadIdx.x; j < tk; j += blockDim.x) dr[j] = scale * pr[j] * (gr[j] - d);
}
