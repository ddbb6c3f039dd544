/* Products of a few rows (a small decode batch) on AMX tiles, for CPUs with AMX-BF16: GPTQ int4 and bf16 weights.
 *
 * Why hand-written: from two rows up, one-row kernels repeat the weight work per row, and with AVX512 dot products
 * the work is the limit: at eight rows gptqmodel's CPU kernel and a vdpbf16ps version of gemv.c both read 2.5-3.3
 * GB/s of int4 codes. A tile product does a 16x16x32 block in one instruction, so widening the codes (as in gemv.c,
 * exact integers 128 + code in bf16) becomes the cost again.
 *
 * Y^T = W X^T by blocks of 16 weight rows: A tiles are 16 rows x 32 inputs of widened codes, B tiles the M rows of
 * x packed in pairs of inputs, C a 16 x M fp32 block summed over one group, then scaled and offset by the group's
 * zero point in fp32: y[m,n] = sum_g scale * (C_g[n,m] - (128 + zero) * X_g[m]). Layouts as in gemv.c
 * (qk_int4_gemv); N a multiple of 16, 1 <= M <= 16.
 *
 * B and C tiles are M columns wide, not 16: at 8 rows a 16-wide B tile loads as many zeros as x values from L2 for
 * every block of weight rows. The int4 product prefetches the next block's codes into L2 while it widens this
 * block's (the hardware prefetchers alone keep 16 rows' streams of codes waiting). Measured over the 3b:layers=2
 * shape's int4 linears in model order at 8 rows (2-core Xeon, a C loop, medians of 15 passes): 22.8 ms before,
 * 16.1 ms with the prefetch, 14.7 ms with narrow tiles too; its bf16 LM head at 8 rows is unchanged (15.2-16.0
 * vs 15.1-15.7 ms, alternating builds). Packing x and its group sums, before the threads start, run vectorized
 * (a pair of inputs as one 32-bit value; group_sums): at the 200m shape's smaller layers these serial loops were a
 * third of the product (its int4 linears at 8 rows 5.0-5.2 -> 3.4-3.7 ms in the same loop).
 *
 * bf16 weights need no widening: A tiles are loaded straight from 16 weight rows (row stride K), C sums all of K.
 * oneDNN does the same through torch, but at a few rows the call's setup costs about as much as the product.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bf16.h"
#include "int4.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define TILE 16

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Asks the kernel for AMX tile state (once per process); 0 when granted. */
int qk_amx_enable(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

/* Tiles for M rows of x: C (0) 16 weight rows x M fp32, A (1) 16 weight rows x 32 bf16, B (2) 16 input pairs x M. */
static void configure(int M) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 3; t++) config.rows[t] = TILE;
    config.colsb[0] = config.colsb[2] = 4 * M, config.colsb[1] = 64;
    _tile_loadconfig(&config);
}

/* x [M, K] transposed in pairs of inputs for B tiles: step s (inputs 32s..32s+31, 32 M values from
 * packed + s * 32 M) is 16 rows (input pairs) of M x rows x 2 bf16. Freed by the caller. */
static uint16_t *pack_pairs(const uint16_t *x, int M, int K) {
    uint16_t *packed = aligned_alloc(64, ((size_t)K * M * sizeof *packed + 63) / 64 * 64);
    uint32_t *pairs = (uint32_t *)packed; /* a pair of inputs moves as one 32-bit value */
    const uint32_t *x_pairs = (const uint32_t *)x;
    for (int m = 0; m < M; m++)
        for (int p = 0; p < K / 2; p++)
            pairs[(size_t)(p / 16) * 16 * M + (p % 16) * M + m] = x_pairs[(size_t)m * (K / 2) + p];
    return packed;
}

/* y[m, n0..n0+15] = block^T + bias, rounded, for the M rows of x (columns 0..M-1 of the block). */
static void store_block(float block[TILE][TILE], int M, int N, int n0, const float *bias, uint16_t *y) {
    for (int m = 0; m < M; m++)
        for (int r = 0; r < TILE; r++) y[(size_t)m * N + n0 + r] = to_bf16(block[r][m] + (bias ? bias[n0 + r] : 0.0f));
}

/* y[M, N] = x[M, K] w[N, K]^T (+ bias[N]); K a multiple of 32. */
void qk_bf16_gemm_amx(const uint16_t *x, int M, const uint16_t *w, int N, int K, const float *bias, uint16_t *y) {
    uint16_t *packed = pack_pairs(x, M, K);
#pragma omp parallel
    {
        configure(M);
        float block[TILE][TILE] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int n0 = 0; n0 < N; n0 += TILE) {
            _tile_zero(0);
            for (int k0 = 0; k0 < K; k0 += 32) {
                _tile_loadd(1, w + (size_t)n0 * K + k0, K * sizeof *w);
                _tile_loadd(2, packed + (size_t)(k0 / 32) * 32 * M, 4 * M);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, block, 64);
            store_block(block, M, N, n0, bias, y);
        }
        _tile_release();
    }
    free(packed);
}

void qk_int4_gemm_amx(const uint16_t *x, int M, const uint8_t *q, const float *scales, const uint8_t *zeros, int N,
                      int K, int group, const float *bias, uint16_t *y) {
    const int G = K / group, steps_per_group = group / 32;
    uint16_t *packed = pack_pairs(x, M, K);
    float *xsum = aligned_alloc(64, (size_t)G * TILE * sizeof *xsum);
    memset(xsum, 0, (size_t)G * TILE * sizeof *xsum);
    float sums[MAX_GROUPS];
    for (int m = 0; m < M; m++) {
        group_sums(x + (size_t)m * K, K, group, sums);
        for (int g = 0; g < G; g++) xsum[(size_t)g * TILE + m] = sums[g];
    }
#pragma omp parallel
    {
        configure(M);
        uint16_t widened[4][TILE][32] __attribute__((aligned(64)));
        /* columns past M of block and total are never stored, only computed: zeroed here so they hold numbers */
        float block[TILE][TILE] __attribute__((aligned(64))) = {{0}}, total[TILE][TILE] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int n0 = 0; n0 < N; n0 += TILE) {
            memset(total, 0, sizeof total);
            int g = 0, left = steps_per_group;
            _tile_zero(0);
            for (int k0 = 0; k0 < K; k0 += 128) {
                for (int r = 0; r < TILE; r++) {
                    __m512bh w[4];
                    const uint8_t *unit = q + (size_t)(n0 + r) * (K / 2) + k0 / 2;
                    _mm_prefetch((const char *)(unit + (size_t)TILE * (K / 2)), _MM_HINT_T1); /* the next block */
                    int4_unit(unit, w);
                    for (int t = 0; t < 4; t++) _mm512_store_si512((void *)widened[t][r], (__m512i)w[t]);
                }
                for (int t = 0; t < 4; t++) {
                    _tile_loadd(1, widened[t], 64);
                    _tile_loadd(2, packed + (size_t)(k0 / 32 + t) * 32 * M, 4 * M);
                    _tile_dpbf16ps(0, 1, 2);
                    if (--left == 0) { /* the end of group g */
                        _tile_stored(0, block, 64);
                        _tile_zero(0);
                        const __m512 sums = _mm512_load_ps(xsum + (size_t)g * TILE);
                        for (int r = 0; r < TILE; r++) {
                            const size_t at = (size_t)(n0 + r) * G + g;
                            const __m512 scale = _mm512_set1_ps(scales[at]);
                            const __m512 offset = _mm512_mul_ps(_mm512_set1_ps((float)(128 + zeros[at])), sums);
                            _mm512_store_ps(total[r], _mm512_fmadd_ps(_mm512_sub_ps(_mm512_load_ps(block[r]), offset),
                                                                      scale, _mm512_load_ps(total[r])));
                        }
                        g++, left = steps_per_group;
                    }
                }
            }
            store_block(total, M, N, n0, bias, y);
        }
        _tile_release();
    }
    free(packed);
    free(xsum);
}
