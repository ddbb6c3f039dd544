/* bf16 <-> fp32 for quantkit's kernels: bf16 values travel as raw uint16 bits; rounding is to nearest even. */
#ifndef QUANTKIT_BF16_H
#define QUANTKIT_BF16_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

static inline uint16_t to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline __m512bh load_bf16(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512((const void *)p); }

static inline __m512 widen(const uint16_t *p) { /* 16 bf16 -> 16 fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

#endif
