/* The bias and ReLU of a float32 Linear + ReLU, on the output of the GEMM torch runs (MKL), in one pass.
 *
 * y = relu(y + b) in place on the GEMM's output [B, N]. torch's addmm first copies the bias into every row of
 * its output and has the GEMM accumulate onto it (a write and a read of [B, N] more), then the ReLU is one
 * more pass; here the GEMM writes once and this pass adds the bias and clamps. NaN follows torch:
 * relu(NaN) = NaN. Rows are split over `threads` OpenMP threads (see fused_head.c).
 */
#include <stdint.h>

void deepfm_bias_relu(float *restrict y, const float *restrict b, int64_t rows, int64_t cols, int64_t threads)
{
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        float *restrict row = y + r * cols;
        for (int64_t c = 0; c < cols; ++c) {
            float v = row[c] + b[c];
            row[c] = v < 0.0f ? 0.0f : v;
        }
    }
}
