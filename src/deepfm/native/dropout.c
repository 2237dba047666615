/* Inverted dropout for a CPU training step: forward and backward, one pass each over the activation.
 *
 * Element i of word w = i / 4 is kept when the 16-bit slice (i % 4) of splitmix64(seed, w) is >= drop, where
 * drop = round(p * 2^16); kept elements are multiplied by scale = 2^16 / (2^16 - drop), dropped ones by 0 (as
 * torch's x * mask: -0 for a negative x, NaN stays NaN). splitmix64 is counter based (word w is a mix of
 * seed + (w + 1) * golden gamma), so the loop has no carried state and vectorises. The caller draws the seed
 * from torch's generator: seeded runs repeat. keep[i] (0/1) is written for the backward pass.
 * x, out and grads are float32, or bfloat16 (uint16) when is_bf16; a bfloat16 product is rounded once, as
 * torch rounds x * mask * scale (the mask product is exact). Split over `threads` OpenMP threads (see
 * fused_head.c); the draws depend on the element's index only, so the split does not change them.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void draw_keep(uint8_t *restrict keep, int64_t n, uint32_t drop, uint64_t seed, int64_t threads)
{
    int64_t full = n / 4;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t w = 0; w < full; ++w) {
        uint64_t z = mix64(seed + (uint64_t)(w + 1) * 0x9e3779b97f4a7c15ull);
        keep[4 * w] = (uint8_t)((z & 0xffffu) >= drop);
        keep[4 * w + 1] = (uint8_t)(((z >> 16) & 0xffffu) >= drop);
        keep[4 * w + 2] = (uint8_t)(((z >> 32) & 0xffffu) >= drop);
        keep[4 * w + 3] = (uint8_t)((z >> 48) >= drop);
    }
    if (full * 4 < n) {
        uint64_t z = mix64(seed + (uint64_t)(full + 1) * 0x9e3779b97f4a7c15ull);
        for (int64_t i = full * 4; i < n; ++i, z >>= 16) keep[i] = (uint8_t)((z & 0xffffu) >= drop);
    }
}

static void apply(const void *x, void *out, const uint8_t *restrict keep, int64_t n, int64_t is_bf16, float scale,
                  int64_t threads)
{
    if (is_bf16) {
        const uint16_t *restrict xs = (const uint16_t *)x;
        uint16_t *restrict o = (uint16_t *)out;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
        for (int64_t i = 0; i < n; ++i) o[i] = to_bf16(from_bf16(xs[i]) * (keep[i] ? scale : 0.0f));
    } else {
        const float *restrict xs = (const float *)x;
        float *restrict o = (float *)out;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
        for (int64_t i = 0; i < n; ++i) o[i] = xs[i] * (keep[i] ? scale : 0.0f);
    }
}

void deepfm_dropout_forward(const void *x, void *out, uint8_t *keep, int64_t n, int64_t is_bf16, int64_t drop,
                            float scale, uint64_t seed, int64_t threads)
{
    draw_keep(keep, n, (uint32_t)drop, seed, threads);
    apply(x, out, keep, n, is_bf16, scale, threads);
}

void deepfm_dropout_backward(const void *grad, const uint8_t *keep, void *out, int64_t n, int64_t is_bf16,
                             float scale, int64_t threads)
{
    apply(grad, out, keep, n, is_bf16, scale, threads);
}
