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

#include "bf16.h"

#define MAX_DIM 1024 /* embedding dims above this take the torch path */

/* One field of a batch row: its vector r[:D] scaled by c (the field's value; 1 for a categorical field, and
 * multiplying by 1 is exact) into x, the running sums s and sq, and its first-order term into *linear. */
static inline void add_field(const float *restrict r, float c, int64_t dim, void *x, int64_t at, int64_t x_bf16,
                             float *restrict s, float *restrict sq, float *restrict linear)
{
    if (x_bf16) {
        uint16_t *restrict out = (uint16_t *)x + at;
        for (int64_t k = 0; k < dim; ++k) out[k] = to_bf16(r[k] * c);
    } else {
        float *restrict out = (float *)x + at;
        for (int64_t k = 0; k < dim; ++k) out[k] = r[k] * c;
    }
    for (int64_t k = 0; k < dim; ++k) {
        const float v = r[k] * c;
        s[k] += v;
        sq[k] += v * v;
    }
    *linear += r[dim] * c;
}

/* first + second order of a row from its sums: linear + 0.5 * (sum_k s_k^2 - sum_k sq_k) */
static inline float first_second_of(const float *restrict s, const float *restrict sq, int64_t dim, float linear)
{
    float sum_sq = 0.0f, squares = 0.0f;
    for (int64_t k = 0; k < dim; ++k) {
        sum_sq += s[k] * s[k];
        squares += sq[k];
    }
    return linear + 0.5f * (sum_sq - squares);
}

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
        for (int64_t f = 0; f < fields; ++f)
            add_field(rows + (b * fields + f) * stride, 1.0f, dim, x, (b * fields + f) * dim, x_bf16, s, sq, &linear);
        first_second[b] = first_second_of(s, sq, dim, linear);
    }
}

/* The scoring pass's forward straight from the table: row b's fields are table rows ids[b, :] (global row ids,
 * [num_rows, D + 1]), each scaled by values[b, f] (NULL: all 1). The same arithmetic as looking the rows up,
 * scaling them and calling deepfm_head_forward, without writing and reading the looked-up rows [B, F, D + 1].
 * Returns -(i + 1) for the first flat index i of an id outside [0, num_rows) (then x and first_second are
 * incomplete), else 0. */
int64_t deepfm_head_gather_forward(const float *restrict table, int64_t num_rows, const int64_t *restrict ids,
                                   const float *restrict values, int64_t batch, int64_t fields, int64_t dim,
                                   void *x, int64_t x_bf16, float *restrict first_second, int64_t threads)
{
    const int64_t stride = dim + 1;
    int64_t bad = batch * fields;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(min : bad) if (threads > 1)
    for (int64_t b = 0; b < batch; ++b) {
        if (b + 2 < batch) /* the rows two batch rows ahead: scattered over the table */
            for (int64_t f = 0; f < fields; ++f) {
                const int64_t id = ids[(b + 2) * fields + f];
                if (id >= 0 && id < num_rows) {
                    __builtin_prefetch(table + id * stride);
                    __builtin_prefetch(table + id * stride + dim);
                }
            }
        float s[MAX_DIM], sq[MAX_DIM];
        for (int64_t k = 0; k < dim; ++k) s[k] = sq[k] = 0.0f;
        float linear = 0.0f;
        for (int64_t f = 0; f < fields; ++f) {
            const int64_t at = b * fields + f, id = ids[at];
            if (id < 0 || id >= num_rows) {
                if (at < bad) bad = at;
                break;
            }
            add_field(table + id * stride, values ? values[at] : 1.0f, dim, x, at * dim, x_bf16, s, sq, &linear);
        }
        first_second[b] = first_second_of(s, sq, dim, linear);
    }
    return bad < batch * fields ? -(bad + 1) : 0;
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

