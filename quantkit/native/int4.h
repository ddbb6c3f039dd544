/* gemv.c's int4 layout, widened: a code beside the byte 0x43 is the bf16 0x43cc = 128 + code, exactly. */
#ifndef QUANTKIT_INT4_H
#define QUANTKIT_INT4_H

#include <immintrin.h>
#include <stdint.h>

#include "bf16.h"

#define MAX_GROUPS 512 /* K / group at most (quantkit.native.MAX_GROUPS) */

/* The four bf16 vectors (inputs 0-31, 32-63, 64-95, 96-127) of one 128-input unit of int4 codes. */
static inline __attribute__((always_inline)) void int4_unit(const uint8_t *unit, __m512bh out[4]) {
    const __m512i bytes = _mm512_loadu_si512((const void *)unit), nibble = _mm512_set1_epi8(0x0f);
    const __m512i exponent = _mm512_set1_epi8(0x43);
    const __m512i low = _mm512_and_si512(bytes, nibble), high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
    out[0] = (__m512bh)_mm512_unpacklo_epi8(low, exponent);
    out[1] = (__m512bh)_mm512_unpackhi_epi8(low, exponent);
    out[2] = (__m512bh)_mm512_unpacklo_epi8(high, exponent);
    out[3] = (__m512bh)_mm512_unpackhi_epi8(high, exponent);
}

/* out[g] = the sum of x over group g (K / group groups of `group` inputs), fp32. */
static inline void group_sums(const uint16_t *x, int K, int group, float *out) {
    for (int g = 0; g < K / group; g++) {
        __m512 sum = _mm512_setzero_ps();
        for (int k = g * group; k < (g + 1) * group; k += 16) sum = _mm512_add_ps(sum, widen(x + k));
        out[g] = _mm512_reduce_add_ps(sum);
    }
}

#endif
