/* One-row products for CPUs with AVX512-BF16: y = W x (+ bias) for the single row of a batch-1 decode step.
 *
 * Why hand-written: at one row, torch's bf16 F.linear (oneDNN) and gptqmodel's CPU int4 kernel read weights well
 * below the machine's copy bandwidth (benchmarks/gemv_bench.py measures all three). Both products here stream
 * four weight rows at a time (prefetching the next four: without it, weights that come from DRAM stream at about
 * half the rate), widen them to bf16 in registers and accumulate with vdpbf16ps in fp32. The prefetches go to L2
 * (T1), as in rows.c: on the 2-core AMD EPYC, prefetched into L1 the weights' stream and the products' work add up
 * instead of overlapping (the 200m LM head 21-23 vs 32-34 GB/s, its int4 layers 18 vs 25 GB/s). Prefetches never
 * fault, so the last block's reach past the end is harmless.
 *
 * x and y are bf16 (raw uint16 bits); sums are fp32; y is rounded to nearest even. Threads: OpenMP over output
 * rows in the process's OpenMP runtime (torch's libgomp: torch.set_num_threads applies, no second pool spins).
 *
 * int4 layout (quantkit/native/__init__.py builds it from a GPTQ checkpoint): row n is K/2 bytes in units of 128
 * inputs, 64 bytes each. Byte 16*L + i of a unit (L = 0-3, i = 0-15) holds in its low nibble the code of unit input
 * 8*L + i (i < 8) or 32 + 8*L + i - 8 (i >= 8), and in its high nibble that input + 64: the order in which the
 * unpacks below read them back. scales[n*G + g] (fp32) and zeros[n*G + g] (0-15) per row and group of `group`
 * inputs: w[n,k] = scale * (code - zero). A code interleaved with the byte 0x43 is the bf16 0x43cc = 128 + code,
 * so with X_g the sum of x over group g:  y[n] = sum_g scale * (sum_k (128 + code) x[k] - (128 + zero) X_g).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "int4.h"

#define ROWS 4          /* weight rows in flight per thread; the next ROWS rows are prefetched meanwhile */

static inline __attribute__((always_inline)) void bf16_rows(
    const uint16_t *restrict x, const uint16_t *restrict w, const int R, int n0, int K, const float *restrict bias,
    uint16_t *restrict y) {
    __m512 acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 32) {
        const __m512bh xs = load_bf16(x + k);
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(w + (size_t)(n0 + r + ROWS) * K + k), _MM_HINT_T1);
            acc[r] = _mm512_dpbf16_ps(acc[r], load_bf16(w + (size_t)(n0 + r) * K + k), xs);
        }
    }
    for (int r = 0; r < R; r++)
        y[n0 + r] = to_bf16(_mm512_reduce_add_ps(acc[r]) + (bias ? bias[n0 + r] : 0.0f));
}

/* y[N] = w[N,K] x[K] (+ bias[N]); K a multiple of 32. */
void qk_bf16_gemv(const uint16_t *x, const uint16_t *w, int N, int K, const float *bias, uint16_t *y) {
    const int blocks = N / ROWS;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) bf16_rows(x, w, ROWS, b * ROWS, K, bias, y);
    for (int n = blocks * ROWS; n < N; n++) bf16_rows(x, w, 1, n, K, bias, y);
}

static inline __attribute__((always_inline)) void int4_rows(
    const uint16_t *restrict x, const float *restrict xsum, const uint8_t *restrict q, const float *restrict scales,
    const uint8_t *restrict zeros, int n0, int K, int group, const float *restrict bias, uint16_t *restrict y) {
    const int R = ROWS, G = K / group, vectors_per_group = group / 32;
    __m512 total[ROWS], acc[ROWS];
    float offset[ROWS];
    for (int r = 0; r < R; r++) total[r] = acc[r] = _mm512_setzero_ps(), offset[r] = 0.0f;
    int g = 0, left = vectors_per_group;
    for (int k0 = 0; k0 < K; k0 += 128) {
        __m512bh ws[ROWS][4];
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(q + (size_t)(n0 + r + ROWS) * (K / 2) + k0 / 2), _MM_HINT_T1);
            int4_unit(q + (size_t)(n0 + r) * (K / 2) + k0 / 2, ws[r]);
        }
        for (int t = 0; t < 4; t++) {
            const __m512bh xs = load_bf16(x + k0 + 32 * t);
            for (int r = 0; r < R; r++) acc[r] = _mm512_dpbf16_ps(acc[r], ws[r][t], xs);
            if (--left == 0) { /* the end of group g: scale its sums, start the next */
                for (int r = 0; r < R; r++) {
                    const size_t at = (size_t)(n0 + r) * G + g;
                    total[r] = _mm512_fmadd_ps(acc[r], _mm512_set1_ps(scales[at]), total[r]);
                    acc[r] = _mm512_setzero_ps();
                    offset[r] += scales[at] * (float)(128 + zeros[at]) * xsum[g];
                }
                g++, left = vectors_per_group;
            }
        }
    }
    for (int r = 0; r < R; r++)
        y[n0 + r] = to_bf16(_mm512_reduce_add_ps(total[r]) - offset[r] + (bias ? bias[n0 + r] : 0.0f));
}

/* y[N] = dequant(q)[N,K] x[K] (+ bias[N]); N a multiple of ROWS (GPTQ packs zeros eight columns to a word), K a
 * multiple of 128, group a multiple of 32 dividing K, K / group at most MAX_GROUPS. */
void qk_int4_gemv(const uint16_t *x, const uint8_t *q, const float *scales, const uint8_t *zeros, int N, int K,
                  int group, const float *bias, uint16_t *y) {
    const int blocks = N / ROWS;
    float xsum[MAX_GROUPS];
    group_sums(x, K, group, xsum);
#pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) int4_rows(x, xsum, q, scales, zeros, b * ROWS, K, group, bias, y);
}
