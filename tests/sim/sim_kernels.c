/* The forward's kernels for the simulated device: the launchers of kernels/lmoe_kernels.h
   with the same arguments, each enqueued on the simulated stream with a copy of its
   parameters (as a launch copies them) and run there in stream order.

   They compute the layer plainly, per (token, expert) pair, from what the device holds
   when they run: the routing from the logits (or the given top-k), each token's adapter
   group from the batch metadata in device memory, the slot's facts from the pool's
   device slot table and its weights from the pool's storage. So a forward is right only
   if the host delivered each of those in stream order, which is what the sim tests
   check. The alignment stages (scan, scatter) and the LoRA shrinks are folded into
   gate/up and down here: they run as empty kernels, to keep the launch order. Storage
   and rounding follow the real kernels (bf16 h, y and out; fp32 accumulation). A
   sharded layer's rank (lmoe_fwd.e0, E_route, part) routes over all E_route experts
   and computes only the pairs of its experts [e0, e0 + E), as route.cu and reduce.cu
   do; its reduce keeps float32 sums in part, and lmoe_k_sum_parts adds the ranks'. */
#include "internal.h"
#include "lmoe_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef float v4f __attribute__((vector_size(16)));

static inline float bf(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t to_bf(float f) { return lmoe_f32_to_bf16(f); }

/* sum_i w[i] * x[i], in four independent 4-lane sums (SSE2 registers on any x86-64) */
static float dot_v4(const float *w, const float *x, int n) {
  v4f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    v4f w0, w1, w2, w3, x0, x1, x2, x3;
    memcpy(&w0, w + i, 16), memcpy(&w1, w + i + 4, 16), memcpy(&w2, w + i + 8, 16), memcpy(&w3, w + i + 12, 16);
    memcpy(&x0, x + i, 16), memcpy(&x1, x + i + 4, 16), memcpy(&x2, x + i + 8, 16), memcpy(&x3, x + i + 12, 16);
    a0 += w0 * x0, a1 += w1 * x1, a2 += w2 * x2, a3 += w3 * x3;
  }
  v4f acc = (a0 + a1) + (a2 + a3);
  float s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  for (; i < n; i++) s += w[i] * x[i];
  return s;
}

#if defined(__x86_64__) && defined(__GNUC__)
typedef float v8f __attribute__((vector_size(32)));
/* the same with 8-lane sums, for CPUs with AVX2 and FMA (picked at run time) */
__attribute__((target("avx2,fma"))) static float dot_v8(const float *w, const float *x, int n) {
  v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    v8f w0, w1, w2, w3, x0, x1, x2, x3;
    memcpy(&w0, w + i, 32), memcpy(&w1, w + i + 8, 32), memcpy(&w2, w + i + 16, 32), memcpy(&w3, w + i + 24, 32);
    memcpy(&x0, x + i, 32), memcpy(&x1, x + i + 8, 32), memcpy(&x2, x + i + 16, 32), memcpy(&x3, x + i + 24, 32);
    a0 += w0 * x0, a1 += w1 * x1, a2 += w2 * x2, a3 += w3 * x3;
  }
  v8f acc = (a0 + a1) + (a2 + a3);
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; i++) s += w[i] * x[i];
  return s;
}

static float (*dot_impl)(const float *, const float *, int);

static float dot(const float *w, const float *x, int n) {
  if (!dot_impl) /* kernels run on the device thread only */
    dot_impl = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? dot_v8 : dot_v4;
  return dot_impl(w, x, n);
}
#else
static float dot(const float *w, const float *x, int n) { return dot_v4(w, x, n); }
#endif

static void to_float(float *dst, const uint16_t *src, size_t n) {
  for (size_t i = 0; i < n; i++) dst[i] = bf(src[i]);
}

/* FP8 layers (lmoe_fwd.fp8): weight row `row` of n codes, dequantized with its row
   block's scales sc (one per 128 columns) */
static void row_fp8(float *dst, const uint16_t *codes16, size_t row, size_t n, const float *sc) {
  const uint8_t *c = (const uint8_t *)codes16 + row * n;
  for (size_t i = 0; i < n; i++) dst[i] = lmoe_f8e4m3_to_f32(c[i]) * sc[i / 128];
}

/* An activation row as quant.cu leaves it: per 128-wide group scale = amax / 448 (1 for
   zeros), code = e4m3(v / scale), dequantized (the FP8 engine's scaled partial sums,
   to float rounding) */
static void quant_row(float *dst, const float *src, size_t n) {
  for (size_t g = 0; g < n; g += 128) {
    size_t e = g + 128 < n ? g + 128 : n;
    float a = 0;
    for (size_t i = g; i < e; i++) a = fabsf(src[i]) > a ? fabsf(src[i]) : a;
    float sc = a > 0 ? a / 448.0f : 1.0f;
    for (size_t i = g; i < e; i++) dst[i] = lmoe_f8e4m3_to_f32(lmoe_f32_to_f8e4m3(src[i] / sc)) * sc;
  }
}

static void *alloc(size_t bytes) {
  void *p = malloc(bytes ? bytes : 1);
  if (!p) abort();
  return p;
}

/* The local expert of pair p (its id minus e0), or -1: another rank's, or no expert. */
static int32_t local_expert(const lmoe_fwd *f, size_t p) {
  int32_t id = f->ids[p], e = id - f->e0;
  return id >= 0 && e >= 0 && e < f->E ? e : -1;
}

/* The pairs (t * k + j) routed to each local expert: order[start[e] .. start[e + 1]). */
static void pairs_by_expert(const lmoe_fwd *f, int32_t *start, int32_t *order) {
  size_t P = (size_t)f->M * f->k;
  for (int32_t e = 0; e <= f->E; e++) start[e] = 0;
  for (size_t p = 0; p < P; p++)
    if (local_expert(f, p) >= 0) start[local_expert(f, p) + 1]++;
  for (int32_t e = 0; e < f->E; e++) start[e + 1] += start[e];
  int32_t *fill = alloc(sizeof(int32_t) * (size_t)(f->E > 0 ? f->E : 1));
  for (int32_t e = 0; e < f->E; e++) fill[e] = start[e];
  for (size_t p = 0; p < P; p++)
    if (local_expert(f, p) >= 0) order[fill[local_expert(f, p)]++] = (int32_t)p;
  free(fill);
}

/* A kernel of the forward whose parameters are the lmoe_fwd alone. */
#define KERNEL(name)                                                   \
  static void name##_run(const void *a);                               \
  static cudaError_t name##_launch(const lmoe_fwd *f, cudaStream_t s) { \
    return lmoe_sim_launch(s, name##_run, f, sizeof *f);               \
  }

/* an H100/H200's limits: the GEMM selector picks the rows it would there (the plain C
   kernels here ignore them) */
cudaError_t lmoe_k_init(lmoe_gemm_device *dev) {
  dev->cc = 90;
  dev->smem_optin = 232448;
  dev->force_cfg = -1;
  dev->sm90 = 0;
  dev->small_tile_pairs = 0;
  dev->shrink_mode = LMOE_SHRINK_BY_K; /* as lmoe_k_init without LMOE_SM90_SHRINK */
  dev->shrink_sn = 0;                  /* as lmoe_k_init without LMOE_SM90_SHRINK_SN */
  dev->fuse_t2 = 0;                    /* as lmoe_k_init without LMOE_SM90_FUSE_T2 */
  dev->fuse_s13 = LMOE_SM90_FUSE_DEFAULT; /* as lmoe_k_init without LMOE_SM90_FUSE_S13 and */
  dev->fuse_s2 = LMOE_SM90_FUSE_DEFAULT;  /* _S2 (sm90 is off here: the shrinks stay kernels) */
  const char *sc = getenv("LMOE_SHARD_CHUNKS"); /* as lmoe_k_init */
  dev->shard_chunks = sc && atoi(sc) > 0 ? atoi(sc) : 0;
  return cudaSuccess;
}

/* FP8 layers compute here (plainly, with the FP8 engine's quantization of x and h) */
cudaError_t lmoe_k_fp8_init(int32_t *available) {
  *available = 1;
  return cudaSuccess;
}

/* ---------------------------------------------------------------- fills */

typedef struct fill_args {
  void *p;
  int32_t dtype;
  int64_t n;
  uint64_t seed;
  float lo, hi;
  double v;
  int random;
} fill_args;

static void fill_run(const void *a_) {
  const fill_args *a = a_;
  float span = a->hi - a->lo;
  for (int64_t i = 0; i < a->n; i++) {
    if (a->random) {
      float prod = span * lmoe_uniform(a->seed, (uint64_t)i);
      lmoe_store_elem(a->p, a->dtype, i, (double)(a->lo + prod));
    } else {
      lmoe_store_elem(a->p, a->dtype, i, a->v);
    }
  }
}

cudaError_t lmoe_k_fill_random(void *p, int32_t dtype, int64_t n, uint64_t seed, float lo, float hi,
                               cudaStream_t s) {
  fill_args a = {p, dtype, n, seed, lo, hi, 0, 1};
  return lmoe_sim_launch(s, fill_run, &a, sizeof a);
}

cudaError_t lmoe_k_fill(void *p, int32_t dtype, int64_t n, double v, cudaStream_t s) {
  fill_args a = {p, dtype, n, 0, 0, 0, v, 0};
  return lmoe_sim_launch(s, fill_run, &a, sizeof a);
}

typedef struct slot_args {
  lmoe_dslot *table;
  int32_t slot;
  lmoe_dslot facts;
} slot_args;

static void set_slot_run(const void *a_) {
  const slot_args *a = a_;
  a->table[a->slot] = a->facts;
}

cudaError_t lmoe_k_set_slot(lmoe_dslot *table, int32_t slot, lmoe_dslot facts, cudaStream_t s) {
  slot_args a = {table, slot, facts};
  return lmoe_sim_launch(s, set_slot_run, &a, sizeof a);
}

typedef struct meta_args {
  int32_t *dst;
  lmoe_meta_param m;
} meta_args;

static void meta_run(const void *a_) {
  const meta_args *a = a_;
  memcpy(a->dst, a->m.v, (size_t)a->m.count * sizeof(int32_t));
}

cudaError_t lmoe_k_meta_write(int32_t *dst, const lmoe_meta_param *m, cudaStream_t s) {
  meta_args a;
  a.dst = dst;
  a.m = *m;
  return lmoe_sim_launch(s, meta_run, &a, sizeof a);
}

/* ---------------------------------------------------------------- forward */

KERNEL(route)
KERNEL(any)
KERNEL(nothing)
KERNEL(reduce)

typedef struct lora_args {
  lmoe_fwd f;
  int lora;
} lora_args;

static void nothing_run(const void *a) { (void)a; }

/* top-k of softmax(logits), as the CPU backend: an equal value never passes an earlier
   expert; weights over all experts, or over the k chosen with renormalise */
static void route_run(const void *a) {
  const lmoe_fwd *f = a;
  const int32_t ER = f->E_route ? f->E_route : f->E; /* the router's experts: all of the layer's */
  float *v = malloc(sizeof(float) * (size_t)ER);
  if (!v) abort();
  if (f->logits) {
    for (int32_t t = 0; t < f->M; t++) {
      float mx = -INFINITY;
      for (int32_t e = 0; e < ER; e++) {
        size_t i = (size_t)t * ER + e;
        v[e] = f->logits_bf16 ? bf(((const uint16_t *)f->logits)[i]) : ((const float *)f->logits)[i];
        if (v[e] > mx) mx = v[e];
      }
      float sum = 0, sel_sum = 0, p[32];
      int32_t sel[32];
      for (int32_t e = 0; e < ER; e++) sum += expf(v[e] - mx);
      for (int32_t j = 0; j < f->k; j++) {
        int32_t best = -1;
        for (int32_t e = 0; e < ER; e++) {
          int taken = 0;
          for (int32_t q = 0; q < j; q++) taken |= sel[q] == e;
          if (!taken && (best < 0 || v[e] > v[best])) best = e;
        }
        sel[j] = best;
        sel_sum += p[j] = expf(v[best] - mx);
      }
      for (int32_t j = 0; j < f->k; j++) {
        f->ids[(size_t)t * f->k + j] = sel[j];
        f->tw[(size_t)t * f->k + j] = p[j] / (f->renorm ? sel_sum : sum);
      }
    }
  }
  free(v);
  /* each token's adapter group, from the metadata on the device */
  for (int32_t t = 0; t < f->M; t++) f->tok_group[t] = 0;
  if (f->meta) {
    const int32_t *offs = lmoe_meta_offsets(f->meta), *grp = lmoe_meta_groups(f->meta);
    for (int32_t i = 0; i < lmoe_meta_requests(f->meta); i++)
      for (int32_t t = offs[i]; t < offs[i + 1] && t < f->M; t++) f->tok_group[t] = grp[i];
  }
}

static void any_run(const void *a) {
  const lmoe_fwd *f = a;
  int32_t any = 0;
  for (int32_t t = 0; t < f->M; t++) any |= f->tok_group[t] != 0;
  f->any[0] = any;
}

/* The slot a token's LoRA comes from, or -1. */
static int32_t token_slot(const lmoe_fwd *f, int lora, int32_t t) {
  if (!lora || !f->meta || f->tok_group[t] <= 0) return -1;
  return lmoe_meta_group_slot(f->meta, f->tok_group[t]);
}

static const uint16_t *slot_base(const lmoe_fwd *f, int32_t slot) {
  return f->pool + (size_t)slot * f->slot_elems;
}

/* h = silu(x W_g^T + LoRA_g) * (x W_u^T + LoRA_u) for every pair, expert by expert
   (each weight row converted once and swept over the expert's pairs) */
static void gateup_run(const void *a_) {
  const lora_args *a = a_;
  const lmoe_fwd *f = &a->f;
  int32_t H = f->H, I = f->I, k = f->k, R13 = 2 * f->R;
  size_t P = (size_t)f->M * k, hs = ((size_t)I + 7) / 8 * 8;
  float *xf = alloc(sizeof(float) * (size_t)f->M * H), *gu = alloc(sizeof(float) * P * 2 * I);
  float *wf = alloc(sizeof(float) * ((size_t)H + (size_t)R13 + 8)), *t13 = wf + H;
  float *lf = alloc(sizeof(float) * ((size_t)R13 * H + 2 * (size_t)I * R13 + 8)); /* a13, b13 as float */
  int32_t *start = alloc(sizeof(int32_t) * ((size_t)f->E + 1)), *order = alloc(sizeof(int32_t) * (P + 1));
  to_float(xf, f->x, (size_t)f->M * H);
  /* FP8: the base product reads x quantized (xb), the shrink below x itself */
  float *xb = xf;
  if (f->fp8) {
    xb = alloc(sizeof(float) * (size_t)f->M * H);
    for (int32_t t = 0; t < f->M; t++) quant_row(xb + (size_t)t * H, xf + (size_t)t * H, (size_t)H);
  }
  pairs_by_expert(f, start, order);
  for (int32_t e = 0; e < f->E; e++) {
    if (start[e] == start[e + 1]) continue;
    for (int32_t i = 0; i < 2 * I; i++) {
      if (f->fp8) /* row i of expert e's [2I, H]: gate's rows, then up's, each blocked on its own */
        row_fp8(wf, f->w13, (size_t)e * 2 * I + i, (size_t)H,
                f->w13s + ((size_t)e * 2 * f->nbi + (i < I ? i / 128 : f->nbi + (i - I) / 128)) * f->nbh);
      else
        to_float(wf, f->w13 + ((size_t)e * 2 * I + i) * H, (size_t)H);
      for (int32_t q = start[e]; q < start[e + 1]; q++) {
        int32_t p = order[q];
        gu[(size_t)p * 2 * I + i] = dot(wf, xb + (size_t)(p / k) * H, H);
      }
    }
  }
  if (xb != xf) free(xb);
  for (size_t p = 0; p < P; p++) {
    int32_t t = (int32_t)(p / k), e = local_expert(f, p), slot = token_slot(f, a->lora, t);
    if (e < 0) continue; /* another rank's pair */
    float *g = gu + p * 2 * I, *u = g + I;
    if (slot >= 0) {
      lmoe_dslot d = f->slots[slot];
      const uint16_t *a13 = slot_base(f, slot) + f->off_a13 + (size_t)e * R13 * H;
      const uint16_t *b13 = slot_base(f, slot) + f->off_b13 + (size_t)e * 2 * I * R13;
      float *af = lf, *bf13 = lf + (size_t)R13 * H;
      to_float(af, a13, (size_t)d.r13 * H);
      to_float(bf13, b13, (size_t)2 * I * R13);
      for (int32_t r = 0; r < d.r13; r++) t13[r] = dot(af + (size_t)r * H, xf + (size_t)t * H, H);
      for (int32_t i = 0; i < I; i++) {
        g[i] += d.sg * dot(bf13 + (size_t)i * R13 + d.g_lo, t13 + d.g_lo, d.g_hi - d.g_lo);
        u[i] += d.su * dot(bf13 + (size_t)(I + i) * R13 + d.u_lo, t13 + d.u_lo, d.u_hi - d.u_lo);
      }
    }
    uint16_t *hr = f->h + p * hs;
    for (int32_t i = 0; i < I; i++) hr[i] = to_bf(g[i] / (1.0f + expf(-g[i])) * u[i]);
  }
  free(xf), free(gu), free(wf), free(lf), free(start), free(order);
}

/* y = w * (h W_2^T + LoRA_d) for every pair, expert by expert */
static void down_run(const void *a_) {
  const lora_args *a = a_;
  const lmoe_fwd *f = &a->f;
  int32_t H = f->H, I = f->I, k = f->k, R = f->R;
  size_t P = (size_t)f->M * k, hs = ((size_t)I + 7) / 8 * 8;
  float *hf = alloc(sizeof(float) * P * I), *yf = alloc(sizeof(float) * P * H);
  float *wf = alloc(sizeof(float) * ((size_t)I + (size_t)R + 8)), *t2 = wf + I;
  float *lf = alloc(sizeof(float) * ((size_t)R * I + (size_t)H * R + 8)); /* a2, b2 as float */
  int32_t *start = alloc(sizeof(int32_t) * ((size_t)f->E + 1)), *order = alloc(sizeof(int32_t) * (P + 1));
  for (size_t p = 0; p < P; p++)
    if (local_expert(f, p) >= 0) to_float(hf + p * I, f->h + p * hs, (size_t)I);
  /* FP8: the base product reads h quantized (hb), the shrink below h itself */
  float *hb = hf;
  if (f->fp8) {
    hb = alloc(sizeof(float) * P * I);
    for (size_t p = 0; p < P; p++)
      if (local_expert(f, p) >= 0) quant_row(hb + p * I, hf + p * I, (size_t)I);
  }
  pairs_by_expert(f, start, order);
  const int32_t n0 = f->n0, n1 = f->n0 + lmoe_k_down_cols(f); /* this launch's columns */
  for (int32_t e = 0; e < f->E; e++) {
    if (start[e] == start[e + 1]) continue;
    for (int32_t c = n0; c < n1; c++) {
      if (f->fp8)
        row_fp8(wf, f->w2, (size_t)e * H + c, (size_t)I, f->w2s + ((size_t)e * f->nbh + c / 128) * f->nbi);
      else
        to_float(wf, f->w2 + ((size_t)e * H + c) * I, (size_t)I);
      for (int32_t q = start[e]; q < start[e + 1]; q++) {
        int32_t p = order[q];
        yf[(size_t)p * H + c] = dot(wf, hb + (size_t)p * I, I);
      }
    }
  }
  if (hb != hf) free(hb);
  for (size_t p = 0; p < P; p++) {
    int32_t t = (int32_t)(p / k), e = local_expert(f, p), slot = token_slot(f, a->lora, t);
    if (e < 0) continue; /* another rank's pair: h was not computed, y is not read */
    float *y = yf + p * H;
    if (slot >= 0) {
      lmoe_dslot d = f->slots[slot];
      const uint16_t *a2 = slot_base(f, slot) + f->off_a2 + (size_t)e * R * I;
      const uint16_t *b2 = slot_base(f, slot) + f->off_b2 + (size_t)e * H * R;
      float *af = lf, *bf2 = lf + (size_t)R * I;
      to_float(af, a2, (size_t)d.r2 * I);
      to_float(bf2, b2, (size_t)H * R);
      for (int32_t r = 0; r < d.r2; r++) t2[r] = dot(af + (size_t)r * I, hf + p * I, I);
      for (int32_t c = n0; c < n1; c++) y[c] += d.sd * dot(bf2 + (size_t)c * R, t2, d.r2);
    }
    for (int32_t c = n0; c < n1; c++) f->y[p * H + c] = to_bf(f->tw[p] * y[c]);
  }
  free(hf), free(yf), free(wf), free(lf), free(start), free(order);
}

static void reduce_run(const void *a) {
  const lmoe_fwd *f = a;
  const int32_t n0 = f->n0, w = lmoe_k_down_cols(f);
  for (int32_t t = 0; t < f->M; t++)
    for (int32_t c = n0; c < n0 + w; c++) {
      float s = 0;
      for (int32_t j = 0; j < f->k; j++)
        if (local_expert(f, (size_t)t * f->k + j) >= 0) s += bf(f->y[((size_t)t * f->k + j) * f->H + c]);
      if (f->part) f->part[(size_t)t * w + (c - n0)] = s; /* the chunk's region: rows of w */
      else f->out[(size_t)t * f->H + c] = to_bf(s);
    }
}

static void sum_parts_run(const void *a_) {
  const lmoe_k_sum *a = a_;
  for (int64_t i = 0; i < a->count; i++) {
    float s = a->part[0][i];
    for (int32_t r = 1; r < a->n; r++) s += a->part[r][i];
    uint16_t b = to_bf(s);
    int64_t at = a->cols > 0 ? i / a->cols * a->ld + i % a->cols : i;
    for (int32_t o = 0; o < a->nout; o++) a->out[o][at] = b;
  }
}

cudaError_t lmoe_k_sum_parts(const lmoe_k_sum *a, cudaStream_t s) {
  if (a->count <= 0 || a->n < 1) return cudaSuccess;
  return lmoe_sim_launch(s, sum_parts_run, a, sizeof *a);
}

cudaError_t lmoe_k_route(const lmoe_fwd *f, cudaStream_t s) { return route_launch(f, s); }
cudaError_t lmoe_k_any(const lmoe_fwd *f, cudaStream_t s) { return any_launch(f, s); }
cudaError_t lmoe_k_scan(const lmoe_fwd *f, cudaStream_t s) { return nothing_launch(f, s); }
cudaError_t lmoe_k_scatter(const lmoe_fwd *f, cudaStream_t s) { return nothing_launch(f, s); }
cudaError_t lmoe_k_gather_x(const lmoe_fwd *f, cudaStream_t s) { return nothing_launch(f, s); }
int lmoe_k_quant_h_needed(const lmoe_fwd *f) { return f->fp8; } /* the simulated gate_up never quantizes h */
cudaError_t lmoe_k_shrink13(const lmoe_fwd *f, cudaStream_t s) { return nothing_launch(f, s); }
cudaError_t lmoe_k_shrink2(const lmoe_fwd *f, cudaStream_t s) { return nothing_launch(f, s); }
cudaError_t lmoe_k_t2_finish(const lmoe_fwd *f, cudaStream_t s) { return nothing_launch(f, s); }
cudaError_t lmoe_k_reduce(const lmoe_fwd *f, cudaStream_t s) { return reduce_launch(f, s); }
/* the quantization is folded into gate/up and down here (their base products read the
   quantized rows, their shrinks the bf16 ones) */
cudaError_t lmoe_k_quant_x(const lmoe_fwd *f, cudaStream_t s) { return nothing_launch(f, s); }
cudaError_t lmoe_k_quant_h(const lmoe_fwd *f, cudaStream_t s) { return nothing_launch(f, s); }

cudaError_t lmoe_k_gateup(const lmoe_fwd *f, int lora, cudaStream_t s) {
  lora_args a = {*f, lora};
  return lmoe_sim_launch(s, gateup_run, &a, sizeof a);
}

cudaError_t lmoe_k_down(const lmoe_fwd *f, int lora, cudaStream_t s) {
  lora_args a = {*f, lora};
  return lmoe_sim_launch(s, down_run, &a, sizeof a);
}
