/* The cpu backend's forward: routing, expert grouping, the two expert GEMMs with the
   per-request LoRA terms fused in, SiLU·up, and the weighted reduction over top-k.

   Shape of the computation (mirrors the device pipeline, DESIGN.md "Data flow"):
     1. route     top-k of the router logits per token (parallel over tokens), or the
                  given ids (checked here: the host can) and weights
     2. align     counting sort of the (token, expert) pairs by expert, cut into tiles
                  of TILE pairs: one work item = (expert, tile)
     3. experts   per item: gu = W13_e x (+ LoRA), h = silu(g)·u rounded to bf16,
                  y = (W2_e h (+ LoRA)) · w  -> y[pair]   (parallel over items)
     4. reduce    out[t] = bf16(sum_j y[t·k + j]) in j order (parallel over tokens)
   Each pair's y row is written by exactly one item and each out row by one reduce
   item, so there are no races and the result does not depend on the thread count.

   Numerics: bf16 storage, fp32 accumulation. h is rounded to bf16 before the down
   projection, as a GPU kernel that stores the intermediate in bf16 would; the float64
   reference (reference.c) applies the same rounding so both define the same result.

   Speed: weights are bf16 in memory; a block of 16 rows is converted to fp32 and
   transposed into a small [K][16] panel once per tile, then a 6-token x 16-row register
   block of fp32 accumulators sweeps K (vector extensions, so gcc emits AVX2/AVX-512 FMAs
   in the clones below without -march=native). Each weight row is read once per tile. */
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
/* ISO C mode turns off a*b+c contraction; allow FMAs in this file's hot loops. */
#pragma GCC optimize("fp-contract=fast")
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(__SANITIZE_ADDRESS__)
/* One build, the best code for the machine it runs on (dispatched once by ifunc). */
#define LMOE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LMOE_CLONES
#endif

enum {
  TILE = 48, /* pairs per work item: one expert's tokens share each converted weight panel */
  MR = 6,    /* tokens per register block */
  NR = 16,   /* weight rows per register block (one fp32 vector of 16) */
  ALIGN = 64,
  REDUCE_CHUNK = 16, /* tokens per reduce / route item */
};

typedef float vf16 __attribute__((vector_size(NR * sizeof(float))));

static inline float bf16f(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline float round_bf16(float f) { return bf16f(lmoe_f32_to_bf16(f)); }

/* ---------------------------------------------------------------- workspace */

typedef struct ws_layout {
  size_t ids, wts, slot_of, offsets, sorted, items, y, scratch; /* byte offsets */
  size_t per_thread;                                             /* scratch bytes per thread */
  size_t xs, gu, hs, panel, sh13, sh2, outp;                     /* inside a thread's scratch */
  size_t total;
} ws_layout;

static size_t up64(size_t n) { return (n + ALIGN - 1) & ~(size_t)(ALIGN - 1); }

static void layout(ws_layout *L, int64_t M, int32_t k, int32_t E, int32_t H, int32_t I,
                   int32_t R, int32_t threads) {
  size_t P = (size_t)M * (size_t)k;
  size_t nitems = (P + TILE - 1) / TILE + (size_t)E;
  size_t o = 0;
  L->ids = o, o += up64(P * sizeof(int32_t));
  L->wts = o, o += up64(P * sizeof(float));
  L->slot_of = o, o += up64((size_t)M * sizeof(int32_t));
  L->offsets = o, o += up64(((size_t)E + 1) * sizeof(int32_t));
  L->sorted = o, o += up64(P * sizeof(int32_t));
  L->items = o, o += up64(nitems * 3 * sizeof(int32_t));
  L->y = o, o += up64(P * (size_t)H * sizeof(float));
  L->scratch = o;
  /* Rows of the token-major scratch arrays: TILE plus a register block of slack, so a
     block that starts near the end never reads past its array. */
  size_t rows = TILE + MR;
  size_t R13 = 2 * (size_t)R;
  size_t kmax = (size_t)(H > I ? H : I);
  if (R13 > kmax) kmax = R13;
  size_t t = 0;
  L->xs = t, t += up64(rows * (size_t)H * sizeof(float));
  L->gu = t, t += up64(rows * 2 * (size_t)I * sizeof(float));
  L->hs = t, t += up64(rows * (size_t)I * sizeof(float));
  L->panel = t, t += up64(kmax * NR * sizeof(float));
  L->sh13 = t, t += up64(rows * (R13 ? R13 : 1) * sizeof(float));
  L->sh2 = t, t += up64(rows * (R ? (size_t)R : 1) * sizeof(float));
  L->outp = t, t += up64(rows * sizeof(float *));
  L->per_thread = t;
  L->total = o + t * (size_t)threads;
}

size_t lmoe_cpu_workspace_bytes(const lmoe_context *ctx, const lmoe_layer_config *cfg,
                                const lmoe_pool_config *pool_cfg) {
  ws_layout L;
  int32_t R = pool_cfg ? pool_cfg->max_rank : 0;
  layout(&L, cfg->max_tokens, cfg->top_k, cfg->num_experts, cfg->hidden, cfg->intermediate, R,
         ctx->threads > 0 ? ctx->threads : 1);
  return L.total + ALIGN; /* room to align the base */
}

/* ---------------------------------------------------------------- GEMM tile */

/* out[t][col0 + r] (=|+=) alpha * sum_h W[r][h] * X[t][h] for r < rows, t < m.
   W is bf16 [rows][ldw]; X is fp32 [m][ldx]; out rows are given as pointers.
   accumulate = 0 stores, 1 adds. panel holds K*NR floats. */
static inline __attribute__((always_inline)) void
gemm_tile(const uint16_t *W, size_t ldw, int32_t rows, int32_t K, const float *X, size_t ldx,
          int32_t m, float *const *outp, int32_t col0, int accumulate, float alpha, float *panel) {
  if (m <= 0 || rows <= 0) return;
  for (int32_t r0 = 0; r0 < rows; r0 += NR) {
    int32_t nb = rows - r0 < NR ? rows - r0 : NR;
    /* bf16 rows -> fp32 panel [K][NR], lanes past nb zero */
    for (int32_t c = 0; c < NR; c++) {
      if (c < nb) {
        const uint16_t *w = W + (size_t)(r0 + c) * ldw;
        for (int32_t h = 0; h < K; h++) panel[(size_t)h * NR + c] = bf16f(w[h]);
      } else {
        for (int32_t h = 0; h < K; h++) panel[(size_t)h * NR + c] = 0.0f;
      }
    }
    for (int32_t t0 = 0; t0 < m; t0 += MR) {
      int32_t mt = m - t0 < MR ? m - t0 : MR;
      /* Rows past m repeat the last valid one: computed, never stored. */
      const float *x0 = X + (size_t)(t0 + (0 < mt ? 0 : mt - 1)) * ldx;
      const float *x1 = X + (size_t)(t0 + (1 < mt ? 1 : mt - 1)) * ldx;
      const float *x2 = X + (size_t)(t0 + (2 < mt ? 2 : mt - 1)) * ldx;
      const float *x3 = X + (size_t)(t0 + (3 < mt ? 3 : mt - 1)) * ldx;
      const float *x4 = X + (size_t)(t0 + (4 < mt ? 4 : mt - 1)) * ldx;
      const float *x5 = X + (size_t)(t0 + (5 < mt ? 5 : mt - 1)) * ldx;
      vf16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0};
      const vf16 *pw = (const vf16 *)panel;
      for (int32_t h = 0; h < K; h++) {
        vf16 w = pw[h];
        a0 += x0[h] * w;
        a1 += x1[h] * w;
        a2 += x2[h] * w;
        a3 += x3[h] * w;
        a4 += x4[h] * w;
        a5 += x5[h] * w;
      }
      vf16 acc[MR] = {a0, a1, a2, a3, a4, a5};
      for (int32_t i = 0; i < mt; i++) {
        float *o = outp[t0 + i] + col0 + r0;
        vf16 v = acc[i] * alpha;
        if (nb == NR) {
          if (accumulate) {
            vf16 old;
            memcpy(&old, o, sizeof old);
            v += old;
          }
          memcpy(o, &v, sizeof v);
        } else {
          for (int32_t c = 0; c < nb; c++) o[c] = accumulate ? o[c] + v[c] : v[c];
        }
      }
    }
  }
}

/* ---------------------------------------------------------------- the forward */

typedef struct fwd {
  lmoe_context *ctx;
  const lmoe_forward_plan *plan;
  int32_t E, H, I, k, R, R13;
  int64_t M;
  const uint16_t *x, *w13, *w2;
  const int32_t *ids;
  const float *wts;
  int32_t *slot_of; /* per token: slot whose LoRA applies, -1 none (only when LoRA runs) */
  const int32_t *sorted, *items;
  float *y;
  uint8_t *scratch;
  const ws_layout *L;
  bool lora;
  int32_t *route_ids; /* routing writes */
  float *route_wts;
} fwd;

static void route_task(void *arg, int64_t item, int32_t thread) {
  (void)thread;
  fwd *f = arg;
  const lmoe_buffer *lg = f->plan->logits;
  int32_t E = f->E, k = f->k;
  int64_t t_end = (item + 1) * REDUCE_CHUNK < f->M ? (item + 1) * REDUCE_CHUNK : f->M;
  for (int64_t t = item * REDUCE_CHUNK; t < t_end; t++) {
    float vals[32];
    int32_t sel[32];
    int32_t n = 0;
    float mx = -INFINITY;
    for (int32_t e = 0; e < E; e++) {
      float v = lg->dtype == LMOE_DTYPE_F32 ? ((const float *)lg->data)[t * E + e]
                                            : bf16f(((const uint16_t *)lg->data)[t * E + e]);
      if (v > mx) mx = v;
      /* keep the k largest in order; an equal value never passes an earlier expert */
      if (n < k || v > vals[n - 1]) {
        int32_t pos = n < k ? n : k - 1;
        while (pos > 0 && vals[pos - 1] < v) {
          if (pos < k) vals[pos] = vals[pos - 1], sel[pos] = sel[pos - 1];
          pos--;
        }
        vals[pos] = v;
        sel[pos] = e;
        if (n < k) n++;
      }
    }
    float sum = 0.0f;
    for (int32_t e = 0; e < E; e++) {
      float v = lg->dtype == LMOE_DTYPE_F32 ? ((const float *)lg->data)[t * E + e]
                                            : bf16f(((const uint16_t *)lg->data)[t * E + e]);
      sum += expf(v - mx);
    }
    float sel_sum = 0.0f, p[32];
    for (int32_t j = 0; j < k; j++) sel_sum += p[j] = expf(vals[j] - mx);
    float den = f->plan->layer->cfg.renormalize ? sel_sum : sum;
    for (int32_t j = 0; j < k; j++) {
      f->route_ids[t * k + j] = sel[j];
      f->route_wts[t * k + j] = p[j] / den;
    }
  }
}

LMOE_CLONES static void expert_task(void *arg, int64_t item, int32_t thread) {
  fwd *f = arg;
  const ws_layout *L = f->L;
  uint8_t *sc = f->scratch + L->per_thread * (size_t)thread;
  float *xs = (float *)(sc + L->xs), *gu = (float *)(sc + L->gu), *hs = (float *)(sc + L->hs);
  float *panel = (float *)(sc + L->panel), *sh13 = (float *)(sc + L->sh13);
  float *sh2 = (float *)(sc + L->sh2);
  float **outp = (float **)(sc + L->outp);
  const size_t H = (size_t)f->H, I = (size_t)f->I, I2 = 2 * I;
  const int32_t e = f->items[3 * item], start = f->items[3 * item + 1], n = f->items[3 * item + 2];
  const int32_t *pairs = f->sorted + start;

  /* gather x rows of the tile as fp32 */
  for (int32_t i = 0; i < n; i++) {
    const uint16_t *xr = f->x + (size_t)(pairs[i] / f->k) * H;
    float *d = xs + (size_t)i * H;
    for (size_t h = 0; h < H; h++) d[h] = bf16f(xr[h]);
  }
  /* gu = W13_e x */
  for (int32_t i = 0; i < n; i++) outp[i] = gu + (size_t)i * I2;
  gemm_tile(f->w13 + (size_t)e * I2 * H, H, (int32_t)I2, (int32_t)H, xs, H, n, outp, 0, 0, 1.0f,
            panel);

  const lmoe_pool *pool = f->plan->pool;
  const size_t R = (size_t)f->R, R13 = (size_t)f->R13;
  /* gate/up LoRA, per run of consecutive tokens sharing a slot (requests are
     contiguous, so a tile has few runs) */
  if (f->lora) {
    for (int32_t s = 0; s < n;) {
      int32_t slot = f->slot_of[pairs[s] / f->k], len = 1;
      while (s + len < n && f->slot_of[pairs[s + len] / f->k] == slot) len++;
      const lmoe_slot *sl = slot >= 0 ? &pool->slots[slot] : NULL;
      if (sl && sl->r13 > 0) {
        const uint16_t *a13 = lmoe_slot_ptr(pool, slot, pool->off_a13) + (size_t)e * R13 * H;
        const uint16_t *b13 = lmoe_slot_ptr(pool, slot, pool->off_b13) + (size_t)e * I2 * R13;
        for (int32_t i = 0; i < len; i++) outp[i] = sh13 + (size_t)(s + i) * R13;
        gemm_tile(a13, H, sl->r13, (int32_t)H, xs + (size_t)s * H, H, len, outp, 0, 0, 1.0f, panel);
        for (int32_t i = 0; i < len; i++) outp[i] = gu + (size_t)(s + i) * I2;
        if (sl->g_hi > sl->g_lo)
          gemm_tile(b13 + sl->g_lo, R13, (int32_t)I, sl->g_hi - sl->g_lo,
                    sh13 + (size_t)s * R13 + sl->g_lo, R13, len, outp, 0, 1, sl->scale_gate, panel);
        if (sl->u_hi > sl->u_lo)
          gemm_tile(b13 + I * R13 + sl->u_lo, R13, (int32_t)I, sl->u_hi - sl->u_lo,
                    sh13 + (size_t)s * R13 + sl->u_lo, R13, len, outp, (int32_t)I, 1, sl->scale_up,
                    panel);
      }
      s += len;
    }
  }
  /* h = silu(g) * u, stored as bf16 values (see the note at the top) */
  for (int32_t i = 0; i < n; i++) {
    const float *g = gu + (size_t)i * I2, *u = g + I;
    float *hr = hs + (size_t)i * I;
    for (size_t c = 0; c < I; c++) hr[c] = round_bf16(g[c] / (1.0f + expf(-g[c])) * u[c]);
  }
  /* y = W2_e h, straight into the pair's row */
  for (int32_t i = 0; i < n; i++) outp[i] = f->y + (size_t)pairs[i] * H;
  gemm_tile(f->w2 + (size_t)e * H * I, I, (int32_t)H, (int32_t)I, hs, I, n, outp, 0, 0, 1.0f,
            panel);
  if (f->lora) {
    for (int32_t s = 0; s < n;) {
      int32_t slot = f->slot_of[pairs[s] / f->k], len = 1;
      while (s + len < n && f->slot_of[pairs[s + len] / f->k] == slot) len++;
      const lmoe_slot *sl = slot >= 0 ? &pool->slots[slot] : NULL;
      if (sl && sl->r2 > 0) {
        const uint16_t *a2 = lmoe_slot_ptr(pool, slot, pool->off_a2) + (size_t)e * R * I;
        const uint16_t *b2 = lmoe_slot_ptr(pool, slot, pool->off_b2) + (size_t)e * H * R;
        for (int32_t i = 0; i < len; i++) outp[i] = sh2 + (size_t)(s + i) * R;
        gemm_tile(a2, I, sl->r2, (int32_t)I, hs + (size_t)s * I, I, len, outp, 0, 0, 1.0f, panel);
        for (int32_t i = 0; i < len; i++) outp[i] = f->y + (size_t)pairs[s + i] * H;
        gemm_tile(b2, R, (int32_t)H, sl->r2, sh2 + (size_t)s * R, R, len, outp, 0, 1, sl->scale_down,
                  panel);
      }
      s += len;
    }
  }
  /* routed weight */
  for (int32_t i = 0; i < n; i++) {
    float w = f->wts[pairs[i]];
    float *yr = f->y + (size_t)pairs[i] * H;
    for (size_t h = 0; h < H; h++) yr[h] *= w;
  }
}

static void reduce_task(void *arg, int64_t item, int32_t thread) {
  (void)thread;
  fwd *f = arg;
  const size_t H = (size_t)f->H;
  uint16_t *out = f->plan->out->data;
  int64_t t_end = (item + 1) * REDUCE_CHUNK < f->M ? (item + 1) * REDUCE_CHUNK : f->M;
  for (int64_t t = item * REDUCE_CHUNK; t < t_end; t++) {
    const float *y0 = f->y + (size_t)t * f->k * H;
    uint16_t *o = out + (size_t)t * H;
    for (size_t h = 0; h < H; h++) {
      float s = y0[h];
      for (int32_t j = 1; j < f->k; j++) s += y0[(size_t)j * H + h];
      o[h] = lmoe_f32_to_bf16(s);
    }
  }
}

lmoe_status lmoe_cpu_forward(lmoe_context *ctx, const lmoe_forward_plan *plan, void *stream) {
  (void)stream;
  const lmoe_layer_config *c = &plan->layer->cfg;
  const lmoe_batch *b = plan->batch;
  const int64_t M = plan->M;
  const int32_t E = c->num_experts, k = c->top_k;
  const int32_t R = plan->pool ? plan->pool->cfg.max_rank : 0;

  /* Given routing: the host can check the ids, so it does, before any work. */
  if (!plan->logits) {
    const int32_t *ids = plan->topk_ids->data;
    for (int64_t i = 0; i < M * k; i++)
      if (ids[i] < 0 || ids[i] >= E)
        return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                         "topk_ids of token %lld (position %d) is %d; experts are 0..%d",
                         (long long)(i / k), (int)(i % k), (int)ids[i], (int)E - 1);
  }

  ws_layout L;
  layout(&L, M, k, E, c->hidden, c->intermediate, R, ctx->threads > 0 ? ctx->threads : 1);
  uint8_t *ws = (uint8_t *)(((uintptr_t)ctx->workspace + ALIGN - 1) & ~(uintptr_t)(ALIGN - 1));
  if (!ctx->workspace || L.total + (size_t)(ws - (uint8_t *)ctx->workspace) > ctx->workspace_bytes)
    return lmoe_fail(ctx, LMOE_ERR_STATE,
                     "the context's workspace (%zu bytes) is smaller than this forward needs (%zu)",
                     ctx->workspace_bytes, L.total + ALIGN);

  fwd f = {0};
  f.ctx = ctx;
  f.plan = plan;
  f.E = E, f.H = c->hidden, f.I = c->intermediate, f.k = k, f.R = R, f.R13 = 2 * R, f.M = M;
  f.x = plan->x->data;
  f.w13 = plan->layer->w13->data;
  f.w2 = plan->layer->w2->data;
  f.slot_of = (int32_t *)(ws + L.slot_of);
  f.y = (float *)(ws + L.y);
  f.scratch = ws + L.scratch;
  f.L = &L;

  /* Which tokens take which adapter. device_sync emulates the old way: the device
     reduces "any token active?", copies the flag back and the host waits on it. */
  bool lora = plan->run_lora;
  if (plan->pool && (lora || plan->guard == LMOE_GUARD_DEVICE_SYNC)) {
    for (int32_t r = 0; r < b->num_requests; r++)
      for (int64_t t = b->offsets[r]; t < b->offsets[r + 1]; t++) f.slot_of[t] = b->req_slot[r];
  }
  if (plan->guard == LMOE_GUARD_DEVICE_SYNC) {
    bool any = false;
    for (int64_t t = 0; plan->pool && t < M && !any; t++) any = f.slot_of[t] >= 0;
    ctx->counters.host_waits++;
    lora = any;
  }
  f.lora = lora && plan->pool;
  if (M == 0) return LMOE_OK;

  /* 1. route */
  if (plan->logits) {
    f.route_ids = (int32_t *)(ws + L.ids);
    f.route_wts = (float *)(ws + L.wts);
    lmoe_cpu_parallel(ctx, (M + REDUCE_CHUNK - 1) / REDUCE_CHUNK, route_task, &f);
    ctx->counters.launches++;
    f.ids = f.route_ids;
    f.wts = f.route_wts;
  } else {
    f.ids = plan->topk_ids->data;
    f.wts = plan->topk_w->data;
  }

  /* 2. align: stable counting sort of pairs by expert, then (expert, tile) items */
  int32_t *off = (int32_t *)(ws + L.offsets), *sorted = (int32_t *)(ws + L.sorted);
  int32_t *items = (int32_t *)(ws + L.items);
  const int64_t P = M * k;
  memset(off, 0, ((size_t)E + 1) * sizeof *off);
  for (int64_t p = 0; p < P; p++) off[f.ids[p] + 1]++;
  int64_t nitems = 0;
  for (int32_t e = 0; e < E; e++) {
    int32_t cnt = off[e + 1];
    off[e + 1] += off[e];
    for (int32_t s = 0; s < cnt; s += TILE) {
      items[3 * nitems] = e;
      items[3 * nitems + 1] = off[e] + s;
      items[3 * nitems + 2] = cnt - s < TILE ? cnt - s : TILE;
      nitems++;
    }
  }
  /* off[e] is now the start of expert e; fill using a running cursor per expert
     (reusing the ids' order keeps tokens ascending inside an expert) */
  for (int64_t p = 0; p < P; p++) sorted[off[f.ids[p]]++] = (int32_t)p;
  f.sorted = sorted;
  f.items = items;

  /* 3. experts (LoRA fused in when it runs: then this task counts as LoRA work) */
  lmoe_cpu_parallel(ctx, nitems, expert_task, &f);
  ctx->counters.launches++;
  if (f.lora) ctx->counters.lora_launches++;

  /* 4. reduce over top-k */
  lmoe_cpu_parallel(ctx, (M + REDUCE_CHUNK - 1) / REDUCE_CHUNK, reduce_task, &f);
  ctx->counters.launches++;
  return LMOE_OK;
}
