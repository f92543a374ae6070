// GELU (tanh approximation) and SiLU, forward and backward: the CUDA twin of src/ops/activation.rs
// (forward_impl / backward_impl), with the same formulas in f32 (CUDA's expf for the CPU's
// exp_f32; both within 2 ulp). One pass each, grid-stride over the elements. candle's CUDA
// backward of its gelu is ~12 elementwise kernels.
//
// kind: 0 = GELU (tanh), 1 = SiLU.

#include "common.cuh"

#define POCL_SQRT_2_OVER_PI 0.7978846f
#define POCL_GELU_C 0.044715f

// sigma(x) = 1 / (1 + e^-x), clamped where sigma saturates in f32 (as the CPU's).
__device__ __forceinline__ float pocl_sigmoid(float x) {
    return 1.0f / (1.0f + expf(-fminf(fmaxf(x, -80.0f), 80.0f)));
}

extern "C" __global__ void pocl_act_forward(const float* x, float* y, long long n, int kind) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const float v = x[i];
        if (kind == 0) {
            // 0.5 (1 + tanh u) = sigma(2u): no cancellation in the negative tail.
            y[i] = v * pocl_sigmoid(2.0f * POCL_SQRT_2_OVER_PI * (v + POCL_GELU_C * v * v * v));
        } else {
            y[i] = v * pocl_sigmoid(v);
        }
    }
}

// dx = dy f'(x).
extern "C" __global__ void pocl_act_backward(const float* x, const float* dy, float* dx,
                                             long long n, int kind) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const float v = x[i];
        if (kind == 0) {
            // With s = sigma(2u): f' = s + 2 v s (1 - s) du/dv.
            const float s =
                pocl_sigmoid(2.0f * POCL_SQRT_2_OVER_PI * (v + POCL_GELU_C * v * v * v));
            const float du = POCL_SQRT_2_OVER_PI * (1.0f + 3.0f * POCL_GELU_C * v * v);
            dx[i] = dy[i] * (s + 2.0f * v * s * (1.0f - s) * du);
        } else {
            const float s = pocl_sigmoid(v);
            dx[i] = dy[i] * s * (1.0f + v * (1.0f - s));
        }
    }
}
