// The embedding's gradient: dW[v] = sum of dy[j] over the tokens j whose id is v, summed in
// token order from 0, as the CPU's index_add (candle's and the fused kernel's) adds the rows,
// so the result is the CPU's to the bit and the same run to run. candle's CUDA index_add runs
// one thread per column over all tokens (768 threads for GPT-2); here one block per used row.
//
// The host groups the tokens by id (a stable counting sort): row r of the used rows is
// rows[r], its tokens are order[starts[r] .. starts[r + 1]] in increasing order. dw is zeroed
// before the launch (unused rows stay 0).

#include "common.cuh"

extern "C" __global__ void pocl_embedding_grad(const float* dy, const unsigned int* order,
                                               const unsigned int* starts,
                                               const unsigned int* rows, unsigned int d,
                                               float* dw) {
    const unsigned int r = blockIdx.x;
    const unsigned int a = starts[r], b = starts[r + 1];
    float* out = dw + (size_t)rows[r] * d;
    for (unsigned int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.0f;
        for (unsigned int t = a; t < b; t++) acc += dy[(size_t)order[t] * d + c];
        out[c] = acc;
    }
}
