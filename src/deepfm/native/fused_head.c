/* DeepFM's training head on the looked-up rows, forward and backward, one pass each.
 *
 * rows [B, F, D + 1] hold each field's vector v (columns :D) and first-order term w (column D). Forward gives
 * the DNN's input x = v flattened to [B, F * D] (float32, or bfloat16 under autocast), the sum of the vectors
 * S [B, D], and first + second order: sum_f w_f + 0.5 * (sum_k S_k^2 - sum_{f,k} v_fk^2) [B]. Backward gives
 * d rows = ((S - v) * g + dx, g) with g the gradient of that logit part [B] and dx the DNN input's.
 * Torch does the same in about nine passes over strided [B, F, D] views; these are one each.
 *
 * Rows of the batch are split over `threads` OpenMP threads. Built with -fopenmp the kernels link the
 * libgomp.so.1 torch has already loaded, so they run on torch's own worker threads (which are still spinning
 * from the previous operation) instead of beside them; without OpenMP the pragmas are ignored (one thread).
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define MAX_DIM 1024 /* embedding dims above this take the torch path */

/* x is float32 [B, F * D] when x_bf16 is 0, else bfloat16 (uint16) */
void deepfm_head_forward(const float *restrict rows, int64_t batch, int64_t fields, int64_t dim, void *x,
                         int64_t x_bf16, float *restrict total, float *restrict first_second, int64_t threads)
{
    const int64_t stride = dim + 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t b = 0; b < batch; ++b) {
        float *restrict s = total + b * dim;
        float sq[MAX_DIM];  /* per-column sums of squares: a single running sum would serialise the adds */
        for (int64_t k = 0; k < dim; ++k) s[k] = sq[k] = 0.0f;
        float linear = 0.0f;
        for (int64_t f = 0; f < fields; ++f) {
            const float *restrict r = rows + (b * fields + f) * stride;
            int64_t at = (b * fields + f) * dim;
            if (x_bf16) {
                uint16_t *restrict out = (uint16_t *)x + at;
                for (int64_t k = 0; k < dim; ++k) out[k] = to_bf16(r[k]);
            } else {
                memcpy((float *)x + at, r, (size_t)dim * sizeof(float));
            }
            for (int64_t k = 0; k < dim; ++k) {
                s[k] += r[k];
                sq[k] += r[k] * r[k];
            }
            linear += r[dim];
        }
        float sum_sq = 0.0f, squares = 0.0f;
        for (int64_t k = 0; k < dim; ++k) {
            sum_sq += s[k] * s[k];
            squares += sq[k];
        }
        first_second[b] = linear + 0.5f * (sum_sq - squares);
    }
}

/* dx is float32 [B, F * D] when dx_bf16 is 0, else bfloat16; NULL: no gradient from the DNN */
void deepfm_head_backward(const float *restrict rows, const float *restrict total, const void *dx,
                          int64_t dx_bf16, const float *restrict g, int64_t batch, int64_t fields, int64_t dim,
                          float *restrict out, int64_t threads)
{
    const int64_t stride = dim + 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t b = 0; b < batch; ++b) {
        const float *restrict s = total + b * dim;
        const float gb = g[b];
        for (int64_t f = 0; f < fields; ++f) {
            const float *restrict r = rows + (b * fields + f) * stride;
            float *restrict o = out + (b * fields + f) * stride;
            int64_t at = (b * fields + f) * dim;
            if (dx == 0) {
                for (int64_t k = 0; k < dim; ++k) o[k] = (s[k] - r[k]) * gb;
            } else if (dx_bf16) {
                const uint16_t *restrict d = (const uint16_t *)dx + at;
                for (int64_t k = 0; k < dim; ++k) o[k] = (s[k] - r[k]) * gb + from_bf16(d[k]);
            } else {
                const float *restrict d = (const float *)dx + at;
                for (int64_t k = 0; k < dim; ++k) o[k] = (s[k] - r[k]) * gb + d[k];
            }
            o[dim] = gb;
        }
    }
}

