/* One GPT-NeoX attention step for the rows of a decode step (one new token per sequence), after the fused q/k/v
 * product:
 * rotary embedding of q and k, the new k and v written into the layer's KV cache, softmax(q k^T * scaling + mask) v.
 *
 * Why hand-written: at one row, transformers' module does this in about twenty small torch ops per layer (views,
 * the rotary slices, products and concatenations, two cache copies, the attention call, the output reshape), each
 * costing more in dispatch and threading than its arithmetic; on the stablelm-200m shape they took about a quarter
 * of a GPTQ decode step (benchmarks/profile_gptq_decode.py). Here it is one call.
 *
 * Numbers: qkv, cache and output are bf16 (raw uint16 bits); the rotated q and k are rounded to bf16 once (the cache
 * holds bf16), scores, mask, softmax and the weighted sum of v are fp32, the output rounded to nearest even.
 * Layouts for M rows: qkv [M][H][3][D] (per head q, k, v, as GPT-NeoX's query_key_value packs them), keys and
 * values [M][H][capacity][D] (the cache buffers), cos and sin [M][R] for each row's new position (R rotary dims, the
 * two halves equal as transformers builds them), mask [M][mask_stride] additive (the first position + 1 used) or
 * NULL, out [M][H][D]; all bf16. Every row writes its new k and v at the same cache index `position` (left-padded
 * rows have their own rotary positions and masks). Threads: OpenMP over rows and heads.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define MAX_HEAD_DIM 256

/* x rotated over its first R dims (rotate-half form) and rounded to bf16 into out; the other dims copied. */
static void rotate(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, int D, int R, uint16_t *out) {
    const int half = R / 2;
    for (int i = 0; i < half; i++) {
        const float a = from_bf16(x[i]), b = from_bf16(x[i + half]);
        out[i] = to_bf16(a * from_bf16(cos[i]) - b * from_bf16(sin[i]));
        out[i + half] = to_bf16(b * from_bf16(cos[i + half]) + a * from_bf16(sin[i + half]));
    }
    memcpy(out + R, x + R, (size_t)(D - R) * sizeof *out);
}

/* D a multiple of 32, at most MAX_HEAD_DIM; R even, at most D; position < capacity. */
void qk_decode_attention(const uint16_t *qkv, int M, const uint16_t *cos_rows, const uint16_t *sin_rows, int H, int D,
                         int R, uint16_t *keys, uint16_t *values, int capacity, int position, const uint16_t *mask_rows,
                         int mask_stride, float scaling, uint16_t *out) {
    const int T = position + 1;
#pragma omp parallel for collapse(2) schedule(static)
    for (int m = 0; m < M; m++)
    for (int h = 0; h < H; h++) {
        const size_t row_head = (size_t)m * H + h;
        const uint16_t *head = qkv + row_head * 3 * D, *cos = cos_rows + (size_t)m * R, *sin = sin_rows + (size_t)m * R;
        const uint16_t *mask = mask_rows ? mask_rows + (size_t)m * mask_stride : NULL;
        uint16_t *k_cache = keys + row_head * capacity * D, *v_cache = values + row_head * capacity * D;
        uint16_t q[MAX_HEAD_DIM] __attribute__((aligned(64)));
        rotate(head, cos, sin, D, R, q);
        rotate(head + D, cos, sin, D, R, k_cache + (size_t)position * D);
        memcpy(v_cache + (size_t)position * D, head + 2 * D, (size_t)D * sizeof *v_cache);

        float scores[T];
        float highest = -INFINITY;
        for (int t = 0; t < T; t++) {
            __m512 dot = _mm512_setzero_ps();
            for (int d = 0; d < D; d += 32)
                dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_loadu_si512(k_cache + (size_t)t * D + d),
                                       (__m512bh)_mm512_load_si512(q + d));
            scores[t] = _mm512_reduce_add_ps(dot) * scaling + (mask ? from_bf16(mask[t]) : 0.0f);
            highest = fmaxf(highest, scores[t]);
        }
        float total = 0.0f;
        for (int t = 0; t < T; t++) total += scores[t] = expf(scores[t] - highest);

        __m512 acc[MAX_HEAD_DIM / 16];
        for (int d = 0; d < D / 16; d++) acc[d] = _mm512_setzero_ps();
        for (int t = 0; t < T; t++) {
            const __m512 p = _mm512_set1_ps(scores[t]);
            for (int d = 0; d < D / 16; d++) acc[d] = _mm512_fmadd_ps(p, widen(v_cache + (size_t)t * D + 16 * d), acc[d]);
        }
        float row[16];
        for (int d = 0; d < D / 16; d++) {
            _mm512_storeu_ps(row, _mm512_div_ps(acc[d], _mm512_set1_ps(total)));
            for (int i = 0; i < 16; i++) out[row_head * D + 16 * d + i] = to_bf16(row[i]);
        }
    }
}
