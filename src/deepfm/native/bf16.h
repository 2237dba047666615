/* bfloat16 <-> float32 as torch casts them: round to nearest even, NaN kept quiet. Shared by the kernels. */
#ifndef DEEPFM_BF16_H
#define DEEPFM_BF16_H
#include <stdint.h>
#include <string.h>

static inline uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16; /* round to nearest even */
    uint32_t quiet_nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded); /* branch-free: vectorises */
}

static inline float from_bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#endif
