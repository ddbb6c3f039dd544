/* Products on AMX tiles, for CPUs with AMX-BF16: GPTQ int4 weights by any number of rows (a small decode batch or a
 * prefill), bf16 weights by up to 16 rows.
 *
 * Why hand-written: from two rows up, one-row kernels repeat the weight work per row, and with AVX512 dot products
 * the work is the limit: at eight rows gptqmodel's CPU kernel and a vdpbf16ps version of gemv.c both read 2.5-3.3
 * GB/s of int4 codes. A tile product does a 16x16x32 block in one instruction, so widening the codes (as in gemv.c,
 * exact integers 128 + code in bf16) becomes the cost again.
 *
 * Y^T = W X^T by blocks of 16 weight rows: A tiles are 16 rows x 32 inputs of widened codes, B tiles the M rows of
 * x packed in pairs of inputs, C a 16 x M fp32 block summed over one group, then scaled and offset by the group's
 * zero point in fp32: y[m,n] = sum_g scale * (C_g[n,m] - (128 + zero) * X_g[m]). Layouts as in gemv.c
 * (qk_int4_gemv); N a multiple of 16.
 *
 * B and C tiles are M columns wide, not 16: at 8 rows a 16-wide B tile loads as many zeros as x values from L2 for
 * every block of weight rows. The int4 product prefetches the next block's codes into L2 while it widens this
 * block's (the hardware prefetchers alone keep 16 rows' streams of codes waiting). Measured over the 3b:layers=2
 * shape's int4 linears in model order at 8 rows (2-core Xeon, a C loop, medians of 15 passes): 22.8 ms before,
 * 16.1 ms with the prefetch, 14.7 ms with narrow tiles too; its bf16 LM head at 8 rows is unchanged (15.2-16.0
 * vs 15.1-15.7 ms, alternating builds). Packing x and its group sums, before the products start, run vectorized
 * (a pair of inputs as one 32-bit value; group_sums): at the 200m shape's smaller layers these serial loops were a
 * third of the product (its int4 linears at 8 rows 5.0-5.2 -> 3.4-3.7 ms in the same loop); from 17 rows on they
 * run on every thread (the 200m shape's [3072 x 1024] at 128 rows: 1.29 -> 0.89 ms).
 *
 * bf16 weights need no widening: A tiles are loaded straight from 16 weight rows (row stride K), C sums all of K.
 * oneDNN does the same through torch, but at a few rows the call's setup costs about as much as the product; from
 * 17 rows on oneDNN is as fast or faster (bf16 [12288 x 4096] at 512 rows: 30-34 ms vs 33-40 ms here).
 *
 * A prefill's int4 product is exact as the decode's, and faster than gptqmodel's kernel where the layers are large:
 * a 128-token prefill of the stablelm-3b:layers=2 GPTQ folder took 108 ms vs 149 ms on gptqmodel's kernel, 512
 * tokens 395 vs 488 ms (2-core Xeon, alternating calls, medians); the 200m shape's 48 vs 50 ms and 177 vs 170 ms. Where the time goes: group ends (C
 * stored, scaled and offset every `group` inputs) about a quarter (the 200m shape's [4096 x 1024] at 512 rows: 4.7
 * ms, 3.5 ms with one group per row), the rest tile loads: each product loads a B tile of x from L2, and these
 * products reach 450-620 GMAC/s at 512 rows where oneDNN's bf16 product, packing its own layout, reaches 800-1000.
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

/* Rows of x go through the tiles in chunks: one chunk of M columns up to 16 rows (a decode batch), else chunks of 16
 * rows (the last padded with zero rows), up to MAX_CHUNKS of them summing at once in C tiles 0-5 while one A tile
 * (6) of weights is loaded once for all of them; B (7) is the chunk's x.
 *
 * More than one chunk (a prefill) goes by panels of PANEL_CHUNKS chunks and blocks of about K_BLOCK inputs: a
 * panel's block of x pairs (768 KiB) stays in L2 while every weight block passes over it, and the panel's totals
 * wait in an fp32 buffer between input blocks (12 x 16 rows x N x 4 bytes at most, whatever the prefill's length). Without the blocks x streamed from L3 for every weight block: int4 [4096 x 16384]
 * at 128 rows 28.3 -> 14.4 ms with them, [12288 x 4096] at 512 rows 84.5 -> 44.4 ms (panels of 6, 12, 24 and 48
 * chunks by blocks of 4096, 2048, 1024 and 512 inputs were within noise of each other but the last, slower). */
#define MAX_CHUNKS 6
#define A_TILE 6
#define B_TILE 7
#define PANEL_CHUNKS 12
#define K_BLOCK 2048

/* Tile instructions take their tile numbers as immediates: OP(t) for C tile t = c. */
#define ON_C_TILE(c, OP) \
    switch (c) { case 0: OP(0); break; case 1: OP(1); break; case 2: OP(2); break; \
                 case 3: OP(3); break; case 4: OP(4); break; default: OP(5); break; }
#define ZERO(t) _tile_zero(t)
#define PRODUCT(t) _tile_dpbf16ps(t, A_TILE, B_TILE)
#define STORE_SUMS(t) _tile_stored(t, sums, 64)

/* Columns (rows of x) per chunk. */
static int chunk_width(int M) { return M < TILE ? M : TILE; }

/* Rows of x in chunk c. */
static inline int chunk_rows(int c, int M, int width) { return M - c * width < width ? M - c * width : width; }

/* Inputs per block: all K for one chunk, else the largest multiple of `unit` (which divides K) up to K_BLOCK that
 * divides K (at least `unit`). */
static int input_block(int K, int unit, int chunks) {
    if (chunks == 1) return K;
    int block = unit >= K_BLOCK ? unit : K_BLOCK / unit * unit;
    while (K % block) block -= unit;
    return block;
}

/* C tiles 16 weight rows x `width` fp32, A 16 weight rows x 32 bf16, B 16 input pairs x `width`. */
static void configure(int width) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t <= B_TILE; t++) config.rows[t] = TILE, config.colsb[t] = 4 * width;
    config.colsb[A_TILE] = 64;
    /* GCC 12's _tile_loadconfig declares a read of 8 bytes of `config`, so the stores of its rows and widths could be
     * dropped as dead (they were, once this file's int4 product was inlined differently): a barrier keeps them. */
    __asm__ volatile("" : : "r"(&config) : "memory");
    _tile_loadconfig(&config);
}

/* x [M, K] transposed in pairs of inputs for B tiles, by chunk: chunk c's step s (inputs 32s..32s+31) is 16 rows (input
 * pairs) of `width` x rows x 2 bf16, at pairs + (c * K / 2 + 16 s) * width; padding rows are zero. Freed by the
 * caller. */
static uint32_t *pack_pairs(const uint16_t *x, int M, int K, int width) {
    const int chunks = (M + width - 1) / width;
    const size_t bytes = (size_t)chunks * width * K * sizeof *x;
    uint32_t *pairs = aligned_alloc(64, (bytes + 63) / 64 * 64); /* a pair of inputs moves as one 32-bit value */
    if (M % width) memset(pairs + (size_t)(chunks - 1) * (K / 2) * width, 0, (size_t)(K / 2) * width * sizeof *pairs);
    const uint32_t *x_pairs = (const uint32_t *)x;
#pragma omp parallel for schedule(static) if (M > TILE)
    for (int m = 0; m < M; m++) {
        uint32_t *chunk = pairs + (size_t)(m / width) * (K / 2) * width + m % width;
        for (int p = 0; p < K / 2; p++) chunk[(size_t)p * width] = x_pairs[(size_t)m * (K / 2) + p];
    }
    return pairs;
}

/* The B tile of chunk c at input step s. */
static inline const uint32_t *b_tile(const uint32_t *pairs, int c, int s, int K, int width) {
    return pairs + ((size_t)c * (K / 2) + (size_t)s * 16) * width;
}

/* The totals of weight block n0 and a panel's chunk c: 16 weight rows x 16 columns in a buffer of (chunks of a panel)
 * x N x 16. */
static inline float *totals_of(float *buffer, int c, int n0, int N) {
    return buffer + ((size_t)c * (N / TILE) + n0 / TILE) * TILE * TILE;
}

/* y[m, n0..n0+15] = block^T + bias, rounded, for rows m0.. of x (columns 0..rows-1 of the block). */
static void store_block(const float *block, int m0, int rows, int N, int n0, const float *bias, uint16_t *y) {
    for (int m = 0; m < rows; m++)
        for (int r = 0; r < TILE; r++)
            y[(size_t)(m0 + m) * N + n0 + r] = to_bf16(block[r * TILE + m] + (bias ? bias[n0 + r] : 0.0f));
}

/* y[M, N] = x[M, K] w[N, K]^T (+ bias[N]); K a multiple of 32, M at most 16 (more rows go to oneDNN, which reads
 * them faster than these tiles). */
void qk_bf16_gemm_amx(const uint16_t *x, int M, const uint16_t *w, int N, int K, const float *bias, uint16_t *y) {
    uint32_t *pairs = pack_pairs(x, M, K, M);
#pragma omp parallel
    {
        configure(M);
        float sums[TILE * TILE] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int n0 = 0; n0 < N; n0 += TILE) {
            _tile_zero(0);
            for (int k0 = 0; k0 < K; k0 += 32) {
                _tile_loadd(A_TILE, w + (size_t)n0 * K + k0, K * sizeof *w);
                _tile_loadd(B_TILE, b_tile(pairs, 0, k0 / 32, K, M), 4 * M);
                PRODUCT(0);
            }
            STORE_SUMS(0);
            store_block(sums, 0, M, N, n0, bias, y);
        }
        _tile_release();
    }
    free(pairs);
}

static int gcd(int a, int b) { return b ? gcd(b, a % b) : a; }

/* One int4 product's operands and its layout of x in chunks. */
typedef struct {
    const uint8_t *q;
    const float *scales, *bias;
    const uint8_t *zeros;
    const uint32_t *pairs; /* pack_pairs */
    const float *xsum;     /* [chunk][group][column] */
    float *buffer;         /* a panel's totals between input blocks: [chunk of the panel][N / 16][16 x 16] */
    uint16_t *y;
    int M, N, K, group, width;
} int4_product;

/* Weight block n0 (16 rows) by chunks c0..c0+pass-1 of the panel from chunk p0 over inputs k1..k1+kb-1 (whole
 * groups): totals[c] from the buffer (or zero at k1 = 0), to the buffer (or y at the last block); `sums` holds a C
 * tile. `pass` a constant where inlined. */
static inline __attribute__((always_inline)) void int4_pass(const int4_product *p, const int pass, int p0, int c0,
                                                            int n0, int k1, int kb,
                                                            float totals[MAX_CHUNKS][TILE * TILE], float *sums) {
    const int K = p->K, G = K / p->group, steps_per_group = p->group / 32;
    uint16_t widened[4][TILE][32] __attribute__((aligned(64)));
    for (int c = 0; c < pass; c++) {
        ON_C_TILE(c, ZERO)
        if (k1 == 0) memset(totals[c], 0, sizeof totals[c]);
        else memcpy(totals[c], totals_of(p->buffer, c0 - p0 + c, n0, p->N), sizeof totals[c]);
    }
    int g = k1 / p->group, left = steps_per_group;
    for (int k0 = k1; k0 < k1 + kb; k0 += 128) {
        for (int r = 0; r < TILE; r++) {
            __m512bh w[4];
            const uint8_t *unit = p->q + (size_t)(n0 + r) * (K / 2) + k0 / 2;
            _mm_prefetch((const char *)(unit + (size_t)TILE * (K / 2)), _MM_HINT_T1); /* the next block */
            int4_unit(unit, w);
            for (int t = 0; t < 4; t++) _mm512_store_si512((void *)widened[t][r], (__m512i)w[t]);
        }
        for (int t = 0; t < 4; t++) {
            _tile_loadd(A_TILE, widened[t], 64);
            for (int c = 0; c < pass; c++) {
                _tile_loadd(B_TILE, b_tile(p->pairs, c0 + c, k0 / 32 + t, K, p->width), 4 * p->width);
                ON_C_TILE(c, PRODUCT)
            }
            if (--left > 0) continue;
            float scale[TILE], zero_scale[TILE]; /* the end of group g: totals += scale * (C - (128 + zero) X) */
            for (int r = 0; r < TILE; r++) {
                const size_t at = (size_t)(n0 + r) * G + g;
                scale[r] = p->scales[at], zero_scale[r] = (float)(128 + p->zeros[at]) * p->scales[at];
            }
            for (int c = 0; c < pass; c++) {
                ON_C_TILE(c, STORE_SUMS)
                ON_C_TILE(c, ZERO)
                const __m512 x_sums = _mm512_load_ps(p->xsum + ((size_t)(c0 + c) * G + g) * TILE);
                for (int r = 0; r < TILE; r++) {
                    float *row = totals[c] + r * TILE;
                    const __m512 offset_row = _mm512_fnmadd_ps(_mm512_set1_ps(zero_scale[r]), x_sums,
                                                               _mm512_load_ps(row));
                    _mm512_store_ps(row, _mm512_fmadd_ps(_mm512_load_ps(sums + r * TILE), _mm512_set1_ps(scale[r]),
                                                         offset_row));
                }
            }
            g++, left = steps_per_group;
        }
    }
    for (int c = 0; c < pass; c++)
        if (k1 + kb == K)
            store_block(totals[c], (c0 + c) * p->width, chunk_rows(c0 + c, p->M, p->width), p->N, n0, p->bias, p->y);
        else
            memcpy(totals_of(p->buffer, c0 - p0 + c, n0, p->N), totals[c], sizeof totals[c]);
}

void qk_int4_gemm_amx(const uint16_t *x, int M, const uint8_t *q, const float *scales, const uint8_t *zeros, int N,
                      int K, int group, const float *bias, uint16_t *y) {
    const int G = K / group, width = chunk_width(M), chunks = (M + width - 1) / width;
    const int kb = input_block(K, 128 / gcd(128, group) * group, chunks); /* whole groups and whole 128-input units */
    float *xsum = aligned_alloc(64, (size_t)chunks * G * TILE * sizeof *xsum);
    memset(xsum, 0, (size_t)chunks * G * TILE * sizeof *xsum);
#pragma omp parallel for schedule(static) if (M > TILE)
    for (int m = 0; m < M; m++) {
        float group_sum[MAX_GROUPS];
        group_sums(x + (size_t)m * K, K, group, group_sum);
        for (int g = 0; g < G; g++) xsum[((size_t)(m / width) * G + g) * TILE + m % width] = group_sum[g];
    }
    const int4_product product = {
        .q = q, .scales = scales, .bias = bias, .zeros = zeros, .pairs = pack_pairs(x, M, K, width), .xsum = xsum,
        .buffer = kb < K ? aligned_alloc(64, (size_t)(chunks < PANEL_CHUNKS ? chunks : PANEL_CHUNKS) * N * TILE *
                                             sizeof(float)) : NULL, /* none at decode */
        .y = y, .M = M, .N = N, .K = K, .group = group, .width = width};
#pragma omp parallel
    {
        configure(width);
        float totals[MAX_CHUNKS][TILE * TILE] __attribute__((aligned(64)));
        /* a C tile narrower than 16 columns leaves the rest of `sums` as it was: zeroed here, so that the group ends'
         * vector arithmetic on those unused columns meets no stack garbage (with garbage there the 200m shape's int4
         * linears at 8 rows took 26-27 ms instead of 3.6-4.3) */
        float sums[TILE * TILE] __attribute__((aligned(64))) = {0};
        for (int p0 = 0; p0 < chunks; p0 += PANEL_CHUNKS) {
            const int panel_end = chunks - p0 < PANEL_CHUNKS ? chunks : p0 + PANEL_CHUNKS;
            for (int k1 = 0; k1 < K; k1 += kb) {
#pragma omp for schedule(static)
                for (int n0 = 0; n0 < N; n0 += TILE)
                    for (int c0 = p0; c0 < panel_end; c0 += MAX_CHUNKS) {
                        const int pass = panel_end - c0 < MAX_CHUNKS ? panel_end - c0 : MAX_CHUNKS;
                        if (pass == 1) int4_pass(&product, 1, p0, c0, n0, k1, kb, totals, sums); /* decode */
                        else int4_pass(&product, pass, p0, c0, n0, k1, kb, totals, sums);
                    }
            }
        }
        _tile_release();
    }
    free((void *)product.pairs);
    free(xsum);
    free(product.buffer);
}
