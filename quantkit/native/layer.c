/* One GPT-NeoX layer (parallel residual, as StableLM-Alpha) for the rows of a decode step, in one call:
 *   out = bf16(bf16(mlp(ln2(x)) + attention(ln1(x))) + x),  mlp(h) = fc2(gelu(fc1(h))),
 * the products on gemv.c's kernels (one row) or rows.c's (2-16 rows), the attention on attention.c's.
 *
 * Why hand-written: at a few rows the products are a small part of what transformers' modules do per layer; the two
 * layer norms, GELU, residual adds, views, module calls and the Python between them cost about as much as the
 * weights take to read (on the stablelm-200m shape, a third of a GPTQ decode step outside quantkit's kernels).
 * Here a layer is one call; each product and the attention keep their own OpenMP loops.
 *
 * Rounding mirrors the module's: layer norms in fp32, rounded to bf16; every product rounded to bf16; GELU (exact,
 * erf) in fp32 on the rounded fc1 output, rounded; the two residual sums rounded one after the other.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

void qk_bf16_gemv(const uint16_t *x, const uint16_t *w, int N, int K, const float *bias, uint16_t *y);
void qk_int4_gemv(const uint16_t *x, const uint8_t *q, const float *scales, const uint8_t *zeros, int N, int K,
                  int group, const float *bias, uint16_t *y);
void qk_int4_gemm(const uint16_t *x, int M, const uint8_t *q, const float *scales, const uint8_t *zeros, int N, int K,
                  int group, const float *bias, uint16_t *y);
void qk_bf16_gemm(const uint16_t *x, int M, const uint16_t *w, int N, int K, const float *bias, uint16_t *y);
void qk_decode_attention(const uint16_t *qkv, int M, const uint16_t *cos, const uint16_t *sin, int H, int D, int R,
                         uint16_t *keys, uint16_t *values, int capacity, int position, const uint16_t *mask,
                         int mask_stride, float scaling, uint16_t *out);

typedef struct {          /* one linear: bf16 weight [N,K] when scales is NULL, else gemv.c's int4 layout */
    const void *weight;
    const float *scales;
    const uint8_t *zeros;
    const float *bias;    /* fp32 [N] or NULL */
    int out_features, in_features, group;
} qk_linear;

typedef struct {
    qk_linear qkv, dense, fc1, fc2;
    const float *ln1_weight, *ln1_bias, *ln2_weight, *ln2_bias;  /* fp32 [hidden] */
    int hidden, heads, head_dim, rotary;
    float eps, scaling;
} qk_layer;

/* y[M, N] = x[M, K] W^T (+ bias): one row on gemv.c, more on rows.c. */
static void product(const qk_linear *l, const uint16_t *x, int M, uint16_t *y) {
    const int N = l->out_features, K = l->in_features;
    if (l->scales && M == 1)
        qk_int4_gemv(x, (const uint8_t *)l->weight, l->scales, l->zeros, N, K, l->group, l->bias, y);
    else if (l->scales)
        qk_int4_gemm(x, M, (const uint8_t *)l->weight, l->scales, l->zeros, N, K, l->group, l->bias, y);
    else if (M == 1)
        qk_bf16_gemv(x, (const uint16_t *)l->weight, N, K, l->bias, y);
    else
        qk_bf16_gemm(x, M, (const uint16_t *)l->weight, N, K, l->bias, y);
}

static void layer_norm(const uint16_t *x, int n, const float *weight, const float *bias, float eps, uint16_t *out) {
    double sum = 0.0, squares = 0.0;
    for (int i = 0; i < n; i++) sum += from_bf16(x[i]);
    const double mean = sum / n;
    for (int i = 0; i < n; i++) squares += (from_bf16(x[i]) - mean) * (from_bf16(x[i]) - mean);
    const float rstd = (float)(1.0 / sqrt(squares / n + eps)), centre = (float)mean;
    for (int i = 0; i < n; i++) out[i] = to_bf16((from_bf16(x[i]) - centre) * rstd * weight[i] + bias[i]);
}

static void gelu(uint16_t *x, int n) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
        const float v = from_bf16(x[i]);
        x[i] = to_bf16(0.5f * v * (1.0f + erff(v * (float)M_SQRT1_2)));
    }
}

/* hidden [M][hidden] bf16 is read and overwritten with the layer's output; keys, values, cos, sin, mask and position
 * as in qk_decode_attention; M at most 16. */
void qk_decode_layer(const qk_layer *L, uint16_t *hidden, int M, const uint16_t *cos, const uint16_t *sin,
                     uint16_t *keys, uint16_t *values, int capacity, int position, const uint16_t *mask,
                     int mask_stride) {
    const int H = L->hidden, F = L->fc1.out_features;
    const size_t rows = (size_t)M * H;
    uint16_t *workspace = malloc((8 * rows + (size_t)M * F) * sizeof *workspace);
    uint16_t *ln1 = workspace, *ln2 = ln1 + rows, *qkv = ln2 + rows, *attended = qkv + 3 * rows;
    uint16_t *attention_out = attended + rows, *mlp_out = attention_out + rows, *up = mlp_out + rows;
    for (int m = 0; m < M; m++) {
        layer_norm(hidden + (size_t)m * H, H, L->ln1_weight, L->ln1_bias, L->eps, ln1 + (size_t)m * H);
        layer_norm(hidden + (size_t)m * H, H, L->ln2_weight, L->ln2_bias, L->eps, ln2 + (size_t)m * H);
    }
    product(&L->qkv, ln1, M, qkv);
    qk_decode_attention(qkv, M, cos, sin, L->heads, L->head_dim, L->rotary, keys, values, capacity, position, mask,
                        mask_stride, L->scaling, attended);
    product(&L->dense, attended, M, attention_out);
    product(&L->fc1, ln2, M, up);
    gelu(up, M * F);
    product(&L->fc2, up, M, mlp_out);
    for (size_t i = 0; i < rows; i++)
        hidden[i] = to_bf16(from_bf16(to_bf16(from_bf16(mlp_out[i]) + from_bf16(attention_out[i]))) +
                            from_bf16(hidden[i]));
    free(workspace);
}
