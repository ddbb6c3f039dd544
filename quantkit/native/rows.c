/* Products of a few rows (a small decode batch, 2-16 rows) with AVX512-BF16 dot products, for CPUs without AMX
 * (AMD Zen 4, Intel Cooper Lake); qk_int4_gemm / qk_bf16_gemm send the rows to amx.c where AMX runs instead.
 *
 * Why hand-written: without AMX, torch's bf16 F.linear and gptqmodel's int4 kernel read a small batch's weights well
 * below the memory bandwidth (on a 2-core AMD EPYC, vLLM's CPU build decoded a batch of 8 faster than both), and a
 * one-row kernel per row would read the weights once per row. Here each weight vector is loaded (and, for int4,
 * widened as in gemv.c) once and dotted with up to ROWS_PER_PASS rows of x, each (weight row, x row) pair summing in
 * its own fp32 register; more rows of x take further passes. The bf16 product prefetches the next weight rows into
 * L2, not L1: prefetched into L1 they evict the rows of x, and DRAM-resident weights stream at two thirds the rate
 * (the 200m shape's linears at 8 rows on a 2-core AMD EPYC: 17.5 vs 26.1 GB/s; the int4 product, bound by its dot
 * products, gains nothing either way).
 *
 * Layouts, rounding and the int4 decomposition are gemv.c's: y[m, n] = sum_g scale * (sum_k (128 + code) x[m, k] -
 * (128 + zero) X_g[m]), fp32 sums, one rounding to bf16. Threads: OpenMP over weight rows.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "int4.h"

#define ROWS_PER_PASS 8  /* rows of x per pass over the weights: 3 x 8 bf16 sums, or 8 int4 sums + 8 totals */
#define BF16_WEIGHT_ROWS 3  /* 3 x 8 sums + 3 weight vectors + x: 28 of the 32 registers */

void qk_int4_gemm_amx(const uint16_t *x, int M, const uint8_t *q, const float *scales, const uint8_t *zeros, int N,
                      int K, int group, const float *bias, uint16_t *y);
void qk_bf16_gemm_amx(const uint16_t *x, int M, const uint16_t *w, int N, int K, const float *bias, uint16_t *y);

static int rows_on_amx = 0;

/* Python sets this when it has checked the CPU's AMX-BF16 flag and the OS's grant of tile state (tests turn it off
 * to run rows.c on AMX machines too). */
void qk_set_amx(int on) { rows_on_amx = on; }
int qk_amx_on(void) { return rows_on_amx; }

/* y[m, n0..n0+R-1] for M rows of x (M <= ROWS_PER_PASS, a constant where inlined). */
static inline __attribute__((always_inline)) void bf16_pass(const uint16_t *restrict x, const int M,
                                                            const uint16_t *restrict w, int n0, const int R, int N,
                                                            int K, const float *restrict bias, uint16_t *restrict y) {
    __m512 acc[BF16_WEIGHT_ROWS][ROWS_PER_PASS];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 32) {
        __m512bh ws[BF16_WEIGHT_ROWS];
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(w + (size_t)(n0 + r + R) * K + k), _MM_HINT_T1);
            ws[r] = load_bf16(w + (size_t)(n0 + r) * K + k);
        }
        for (int m = 0; m < M; m++) {
            const __m512bh xs = load_bf16(x + (size_t)m * K + k);
            for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], ws[r], xs);
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++)
            y[(size_t)m * N + n0 + r] = to_bf16(_mm512_reduce_add_ps(acc[r][m]) + (bias ? bias[n0 + r] : 0.0f));
}

/* One pass's M as a compile-time constant, so the sums stay in registers. */
#define DISPATCH_ROWS(M, CALL) \
    switch (M) { \
    case 1: { const int rows_ = 1; CALL; break; } case 2: { const int rows_ = 2; CALL; break; } \
    case 3: { const int rows_ = 3; CALL; break; } case 4: { const int rows_ = 4; CALL; break; } \
    case 5: { const int rows_ = 5; CALL; break; } case 6: { const int rows_ = 6; CALL; break; } \
    case 7: { const int rows_ = 7; CALL; break; } default: { const int rows_ = 8; CALL; break; } }

/* y[M, N] = x[M, K] w[N, K]^T (+ bias[N]); K a multiple of 32. */
static void bf16_gemm_avx512(const uint16_t *x, int M, const uint16_t *w, int N, int K, const float *bias,
                             uint16_t *y) {
    const int blocks = N / BF16_WEIGHT_ROWS;
    for (int m0 = 0; m0 < M; m0 += ROWS_PER_PASS) {
        const int rows = M - m0 < ROWS_PER_PASS ? M - m0 : ROWS_PER_PASS;
        const uint16_t *xs = x + (size_t)m0 * K;
        uint16_t *ys = y + (size_t)m0 * N;
#pragma omp parallel for schedule(static)
        for (int b = 0; b < blocks; b++)
            DISPATCH_ROWS(rows, bf16_pass(xs, rows_, w, b * BF16_WEIGHT_ROWS, BF16_WEIGHT_ROWS, N, K, bias, ys))
        for (int n = blocks * BF16_WEIGHT_ROWS; n < N; n++)
            DISPATCH_ROWS(rows, bf16_pass(xs, rows_, w, n, 1, N, K, bias, ys))
    }
}

/* y[m, n] for M rows of x (M <= ROWS_PER_PASS, a constant where inlined); xsum [M][G]. */
static inline __attribute__((always_inline)) void int4_pass(
    const uint16_t *restrict x, const float *restrict xsum, const int M, const uint8_t *restrict q,
    const float *restrict scales, const uint8_t *restrict zeros, int n, int N, int K, int group,
    const float *restrict bias, uint16_t *restrict y) {
    const int G = K / group, vectors_per_group = group / 32;
    __m512 total[ROWS_PER_PASS], acc[ROWS_PER_PASS];
    float offset[ROWS_PER_PASS];
    for (int m = 0; m < M; m++) total[m] = acc[m] = _mm512_setzero_ps(), offset[m] = 0.0f;
    const uint8_t *row = q + (size_t)n * (K / 2);
    int g = 0, left = vectors_per_group;
    for (int k0 = 0; k0 < K; k0 += 128) {
        __m512bh ws[4];
        _mm_prefetch((const char *)(row + 2 * (K / 2) + k0 / 2), _MM_HINT_T0); /* two rows ahead */
        int4_unit(row + k0 / 2, ws);
        for (int t = 0; t < 4; t++) {
            for (int m = 0; m < M; m++)
                acc[m] = _mm512_dpbf16_ps(acc[m], ws[t], load_bf16(x + (size_t)m * K + k0 + 32 * t));
            if (--left == 0) { /* the end of group g */
                const float scale = scales[(size_t)n * G + g], zero = (float)(128 + zeros[(size_t)n * G + g]);
                for (int m = 0; m < M; m++) {
                    total[m] = _mm512_fmadd_ps(acc[m], _mm512_set1_ps(scale), total[m]);
                    acc[m] = _mm512_setzero_ps();
                    offset[m] += scale * zero * xsum[(size_t)m * G + g];
                }
                g++, left = vectors_per_group;
            }
        }
    }
    for (int m = 0; m < M; m++)
        y[(size_t)m * N + n] = to_bf16(_mm512_reduce_add_ps(total[m]) - offset[m] + (bias ? bias[n] : 0.0f));
}

/* Layouts as in gemv.c's qk_int4_gemv; K a multiple of 128, group a multiple of 32 dividing K. */
static void int4_gemm_avx512(const uint16_t *x, int M, const uint8_t *q, const float *scales, const uint8_t *zeros,
                             int N, int K, int group, const float *bias, uint16_t *y) {
    const int G = K / group;
    float *xsum = malloc((size_t)M * G * sizeof *xsum);
    for (int m = 0; m < M; m++) group_sums(x + (size_t)m * K, K, group, xsum + (size_t)m * G);
    for (int m0 = 0; m0 < M; m0 += ROWS_PER_PASS) {
        const int rows = M - m0 < ROWS_PER_PASS ? M - m0 : ROWS_PER_PASS;
        const uint16_t *xs = x + (size_t)m0 * K;
        const float *sums = xsum + (size_t)m0 * G;
        uint16_t *ys = y + (size_t)m0 * N;
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++)
            DISPATCH_ROWS(rows, int4_pass(xs, sums, rows_, q, scales, zeros, n, N, K, group, bias, ys))
    }
    free(xsum);
}

/* y[M, N] = x[M, K] W^T (+ bias) for 2-16 rows: amx.c where AMX runs (N a multiple of 16 there), else the above. */
void qk_int4_gemm(const uint16_t *x, int M, const uint8_t *q, const float *scales, const uint8_t *zeros, int N, int K,
                  int group, const float *bias, uint16_t *y) {
    (rows_on_amx ? qk_int4_gemm_amx : int4_gemm_avx512)(x, M, q, scales, zeros, N, K, group, bias, y);
}

void qk_bf16_gemm(const uint16_t *x, int M, const uint16_t *w, int N, int K, const float *bias, uint16_t *y) {
    (rows_on_amx ? qk_bf16_gemm_amx : bf16_gemm_avx512)(x, M, w, N, K, bias, y);
}
