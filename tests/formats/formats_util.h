/* Helpers of the formats tests: an adapter as float64 weight deltas per expert
   (PEFT's math: delta = scale * B @ A), and an independent float64 MoE forward that
   applies such deltas per token, to compare the library's results with. */
#ifndef LMOE_FORMATS_UTIL_H
#define LMOE_FORMATS_UTIL_H

#include "test_util.h"

typedef struct host_delta {
  int E, H, I;
  double *d13; /* [E, 2I, H]: gate rows then up rows; zero where not targeted */
  double *d2;  /* [E, H, I] */
} host_delta;

static host_delta delta_new(int E, int H, int I) {
  host_delta d = {E, H, I, calloc((size_t)E * 2 * I * H, sizeof(double)), calloc((size_t)E * H * I, sizeof(double))};
  return d;
}

static void delta_free(host_delta *d) {
  free(d->d13);
  free(d->d2);
  d->d13 = d->d2 = NULL;
}

/* dst[o, i] += scale * sum_j B[o, j] A[j, i], with element accessors as strides. */
static void add_ba(double *dst, int out, int in, int r, double scale, const float *A, long a_row, long a_col,
                   const float *B, long b_row, long b_col) {
  for (int o = 0; o < out; o++)
    for (int i = 0; i < in; i++) {
      double s = 0;
      for (int j = 0; j < r; j++) s += (double)B[o * b_row + j * b_col] * (double)A[j * a_row + i * a_col];
      dst[(long)o * in + i] += scale * s;
    }
}

static double rel_l2(const double *a, const double *ref, long n) {
  double num = 0, den = 0;
  for (long i = 0; i < n; i++) {
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

static double silu(double v) { return v / (1 + exp(-v)); }

/* out[M, H] = MoE over given routing; token t uses deltas[t] (NULL: base only). */
static void own_forward(int M, int E, int H, int I, int K, const double *x, const int32_t *ids, const float *w,
                        const double *W13, const double *W2, const host_delta *const *deltas, double *out) {
  double *gu = malloc((size_t)2 * I * sizeof(double)), *h = malloc((size_t)I * sizeof(double));
  (void)E;
  for (int t = 0; t < M; t++) {
    const double *xt = x + (long)t * H;
    for (int o = 0; o < H; o++) out[(long)t * H + o] = 0;
    for (int k = 0; k < K; k++) {
      int e = ids[t * K + k];
      const host_delta *d = deltas[t];
      for (int o = 0; o < 2 * I; o++) {
        double s = 0;
        const double *wr = W13 + ((long)e * 2 * I + o) * H;
        const double *dr = d ? d->d13 + ((long)e * 2 * I + o) * H : NULL;
        for (int i = 0; i < H; i++) s += (wr[i] + (dr ? dr[i] : 0)) * xt[i];
        gu[o] = s;
      }
      for (int i = 0; i < I; i++) h[i] = silu(gu[i]) * gu[I + i];
      for (int o = 0; o < H; o++) {
        double s = 0;
        const double *wr = W2 + ((long)e * H + o) * I;
        const double *dr = d ? d->d2 + ((long)e * H + o) * I : NULL;
        for (int i = 0; i < I; i++) s += (wr[i] + (dr ? dr[i] : 0)) * h[i];
        out[(long)t * H + o] += w[t * K + k] * s;
      }
    }
  }
  free(gu);
  free(h);
}

/* A layer's weights as float64 (for own_forward). */
static void layer_weights_f64(lmoe_context *ctx, lmoe_layer *layer, double **W13, double **W2) {
  lmoe_buffer *b13, *b2;
  OK(ctx, lmoe_layer_weights(layer, 0, &b13));
  OK(ctx, lmoe_layer_weights(layer, 1, &b2));
  lmoe_buffer_desc d13, d2;
  lmoe_buffer_describe(b13, &d13);
  lmoe_buffer_describe(b2, &d2);
  *W13 = malloc((size_t)d13.numel * sizeof(double));
  *W2 = malloc((size_t)d2.numel * sizeof(double));
  OK(ctx, lmoe_buffer_read(b13, 0, *W13, LMOE_DTYPE_F64, d13.numel));
  OK(ctx, lmoe_buffer_read(b2, 0, *W2, LMOE_DTYPE_F64, d2.numel));
}

/* Random routing: K distinct experts per token, positive weights summing to 1. */
static void random_routing(int M, int E, int K, int32_t *ids, float *w) {
  for (int t = 0; t < M; t++) {
    float sum = 0;
    for (int k = 0; k < K; k++) {
      int e, dup;
      do {
        e = test_randint(0, E - 1);
        dup = 0;
        for (int j = 0; j < k; j++) dup |= ids[t * K + j] == e;
      } while (dup);
      ids[t * K + k] = e;
      w[t * K + k] = test_randf(0.1f, 1.0f);
      sum += w[t * K + k];
    }
    for (int k = 0; k < K; k++) w[t * K + k] /= sum;
  }
}

/* Runs lmoe_forward and lmoe_reference_forward on the batch and compares both with
   `want` [M, H]. Returns the forward's rel L2. */
static double check_forward(lmoe_context *ctx, lmoe_layer *layer, lmoe_pool *pool, lmoe_batch *batch,
                            lmoe_buffer *x, lmoe_buffer *ids, lmoe_buffer *w, const double *want, int M, int H,
                            const char *what) {
  lmoe_buffer *out = test_buffer(ctx, LMOE_DTYPE_BF16, M, H);
  int64_t shape[2] = {M, H};
  lmoe_buffer *ref = NULL;
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_F64, LMOE_MEMORY_HOST, 2, shape, &ref));
  lmoe_forward_args a;
  lmoe_forward_args_init(&a);
  a.layer = layer;
  a.pool = pool;
  a.batch = batch;
  a.x = x;
  a.topk_ids = ids;
  a.topk_weights = w;
  a.out = out;
  OK(ctx, lmoe_forward(ctx, &a, NULL));
  OK(ctx, lmoe_context_synchronize(ctx, NULL));
  a.out = ref;
  OK(ctx, lmoe_reference_forward(ctx, &a));
  double *got = malloc((size_t)M * H * sizeof(double)), *gref = malloc((size_t)M * H * sizeof(double));
  OK(ctx, lmoe_buffer_read(out, 0, got, LMOE_DTYPE_F64, (int64_t)M * H));
  OK(ctx, lmoe_buffer_read(ref, 0, gref, LMOE_DTYPE_F64, (int64_t)M * H));
  double e_fwd = rel_l2(got, want, (long)M * H), e_ref = rel_l2(gref, want, (long)M * H);
  CHECK(e_ref < 1e-2, "%s: reference vs PEFT math rel L2 %.3g", what, e_ref);
  CHECK(e_fwd < 1e-2, "%s: forward vs PEFT math rel L2 %.3g", what, e_fwd);
  free(got);
  free(gref);
  lmoe_buffer_release(out);
  lmoe_buffer_release(ref);
  return e_fwd;
}

#endif
