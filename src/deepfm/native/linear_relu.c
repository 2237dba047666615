/* The pointwise ends of a float32 Linear + ReLU, around the GEMM that torch runs (MKL): one pass each.
 *
 * Forward: y = relu(y + b) in place on the GEMM's output [B, N]. torch's addmm first copies the bias into
 * every row of its output and has the GEMM accumulate onto it (a write and a read of [B, N] more), then the
 * ReLU is one more pass; here the GEMM writes once and this pass adds the bias and clamps.
 * Backward: g = dy where y > 0 (else 0) and the bias gradient db = sum over rows of g, in one pass over dy and
 * y instead of threshold_backward's pass and a column sum's. NaN follows torch: relu(NaN) = NaN, and NaN
 * activations pass their gradient.
 *
 * Rows are split over `threads` OpenMP threads (see fused_head.c). db is summed in fixed blocks of BLOCK rows,
 * each block's partial sums added in block order, so it does not depend on the number of threads.
 */
#include <stdint.h>

#define BLOCK 64

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

/* partial: scratch of ceil(rows / BLOCK) * cols floats */
void deepfm_relu_bias_grad(const float *restrict dy, const float *restrict y, float *restrict g,
                           float *restrict db, float *restrict partial, int64_t rows, int64_t cols,
                           int64_t threads)
{
    const int64_t blocks = (rows + BLOCK - 1) / BLOCK;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t k = 0; k < blocks; ++k) {
            float *restrict acc = partial + k * cols;
            for (int64_t c = 0; c < cols; ++c) acc[c] = 0.0f;
            const int64_t end = (k + 1) * BLOCK < rows ? (k + 1) * BLOCK : rows;
            for (int64_t r = k * BLOCK; r < end; ++r) {
                const float *restrict dr = dy + r * cols;
                const float *restrict yr = y + r * cols;
                float *restrict gr = g + r * cols;
                for (int64_t c = 0; c < cols; ++c) {
                    float v = yr[c] <= 0.0f ? 0.0f : dr[c];
                    gr[c] = v;
                    acc[c] += v;
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < cols; ++c) {
            float s = 0.0f;
            for (int64_t k = 0; k < blocks; ++k) s += partial[k * cols + c];
            db[c] = s;
        }
    }
}
