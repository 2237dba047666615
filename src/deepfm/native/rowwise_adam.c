/* Row-wise (lazy) Adam for an embedding table from an uncoalesced row-sparse gradient, in one pass.
 *
 * The torch path sorts the N looked-up row ids (torch.unique), sums duplicate gradient rows with a
 * scatter_add, then gathers, updates and scatters the touched rows of the weights and both moments: about
 * seven passes over [N, D] or [U, D] arrays. Here a row -> slot map (int32 [R], -1 when free, restored
 * before returning) replaces the sort: duplicates are summed in order of appearance into slot rows, and each
 * touched row of w, m, v is then updated in place, fetching rows ahead (they are scattered over the table).
 * Summation order is the lookup order, so results are deterministic; they equal the torch path up to float
 * rounding of the duplicate sums.
 *
 * Summing duplicates runs on one thread (it is ordered); the update of the distinct rows is split over
 * `threads` OpenMP threads, on torch's own worker threads (see fused_head.c): each row is one thread's.
 *
 * Plain C99 with no Python or torch headers: deepfm compiles it on first use and calls it through ctypes
 * (which releases the GIL for the call).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PREFETCH_ROWS 12

/* Updates the rows ids[0..n) of w, m, v ([num_rows, dim], float32, contiguous) with gradient rows
 * grad[n, dim]; slot is int32 [num_rows], all -1; acc [n, dim] and rows [n] are scratch. 1 - beta1 and
 * 1 - beta2 come from the caller, computed in double as torch does (1.0f - 0.999f is off by 1.3e-5).
 * Returns the number of distinct rows updated, or -(i + 1) when ids[i] is outside [0, num_rows): then
 * nothing has been changed. */
int64_t deepfm_rowwise_adam(float *restrict w, float *restrict m, float *restrict v, int64_t num_rows,
                            int64_t dim, const int64_t *ids, const float *grad, int64_t n,
                            int32_t *restrict slot, float *restrict acc, int64_t *restrict rows,
                            float lr_over_bias1, float one_minus_beta1, float beta2, float one_minus_beta2,
                            float bias2, float eps, int64_t threads)
{
    int64_t u = 0;
    for (int64_t i = 0; i < n; ++i) {
        int64_t id = ids[i];
        if (id < 0 || id >= num_rows) {
            for (int64_t k = 0; k < u; ++k) slot[rows[k]] = -1;
            return -(i + 1);
        }
        const float *g = grad + i * dim;
        int32_t s = slot[id];
        if (s < 0) {
            s = (int32_t)u++;
            slot[id] = s;
            rows[s] = id;
            memcpy(acc + (int64_t)s * dim, g, (size_t)dim * sizeof(float));
        } else {
            float *a = acc + (int64_t)s * dim;
            for (int64_t k = 0; k < dim; ++k) a[k] += g[k];
        }
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && u >= 4096)
    for (int64_t s = 0; s < u; ++s) {
        if (s + PREFETCH_ROWS < u) {
            int64_t q = rows[s + PREFETCH_ROWS] * dim;
            __builtin_prefetch(w + q, 1); __builtin_prefetch(w + q + dim - 1, 1);
            __builtin_prefetch(m + q, 1); __builtin_prefetch(m + q + dim - 1, 1);
            __builtin_prefetch(v + q, 1); __builtin_prefetch(v + q + dim - 1, 1);
        }
        int64_t r = rows[s];
        slot[r] = -1;
        const float *g = acc + s * dim;
        float *wr = w + r * dim, *mr = m + r * dim, *vr = v + r * dim;
        for (int64_t k = 0; k < dim; ++k) {
            float gk = g[k];
            float mk = mr[k] + one_minus_beta1 * (gk - mr[k]);
            float vk = vr[k] * beta2 + one_minus_beta2 * gk * gk;
            mr[k] = mk;
            vr[k] = vk;
            wr[k] -= lr_over_bias1 * mk / (sqrtf(vk / bias2) + eps);
        }
    }
    return u;
}
