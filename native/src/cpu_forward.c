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

   Speed: per work item the tokens are the vector lanes: x, gu, h and y live in
   feature-major tiles [features][TILE]. A block of MR = 6 bf16 weight rows is widened
   to fp32 once per tile, then for each group of 16 tokens 6 vector accumulators sweep
   K with one vector load of x and 6 broadcasts of w per step (vector extensions, so
   gcc emits AVX2/AVX-512 FMAs in the clones below without -march=native). Each weight
   row is read once per tile of up to TILE tokens. */
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
  TILE = 64, /* pairs per work item: one expert's tokens share each widened weight row */
  MR = 6,    /* weight rows per register block */
  NR = 16,   /* tokens per register block (one fp32 vector of 16 lanes) */
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
  size_t xt, gut, ht, wbuf, sh13t, sh2t;                         /* inside a thread's scratch */
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
  /* Per thread, feature-major tiles [features][TILE] (tokens are the vector lanes):
     xt holds x and later y (x is dead once gate/up are done). */
  size_t R13 = 2 * (size_t)R;
  size_t kmax = (size_t)(H > I ? H : I);
  if (R13 > kmax) kmax = R13;
  size_t t = 0, lane = TILE * sizeof(float);
  L->xt = t, t += up64((size_t)H * lane);
  L->gut = t, t += up64(2 * (size_t)I * lane);
  L->ht = t, t += up64((size_t)I * lane);
  L->wbuf = t, t += up64(MR * kmax * sizeof(float));
  L->sh13t = t, t += up64((R13 ? R13 : 1) * lane);
  L->sh2t = t, t += up64((R ? (size_t)R : 1) * lane);
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

/* OUT[r][lane] (=|+=) alpha * sum_h W[r][h] * XT[h][lane], for r < rows and lanes in
   [lo, hi). W is bf16 [rows][ldw]; XT and OUT are feature-major fp32 tiles with TILE
   lanes per row. accumulate = 0 stores, 1 adds. wbuf holds MR*K floats.
   MR weight rows are widened to fp32 once, then for each group of NR lanes a register
   block of MR x NR accumulators sweeps K: one vector load of x and MR broadcasts of
   w feed MR vector FMAs per step. */
static inline __attribute__((always_inline)) void
gemm_tile(const uint16_t *W, size_t ldw, int32_t rows, int32_t K, const float *XT, int32_t lo,
          int32_t hi, float *OUT, int accumulate, float alpha, float *wbuf) {
  if (hi <= lo || rows <= 0) return;
  for (int32_t r0 = 0; r0 < rows; r0 += MR) {
    int32_t nr = rows - r0 < MR ? rows - r0 : MR;
    for (int32_t i = 0; i < nr; i++) {
      const uint16_t *w = W + (size_t)(r0 + i) * ldw;
      float *d = wbuf + (size_t)i * K;
      for (int32_t h = 0; h < K; h++) { /* bf16 -> fp32: the bits move up 16 */
        uint32_t u = (uint32_t)w[h] << 16;
        memcpy(&d[h], &u, sizeof u);
      }
    }
    /* rows past nr repeat the last one: computed, never stored */
    const float *w0 = wbuf, *w1 = wbuf + (size_t)(1 < nr ? 1 : nr - 1) * K;
    const float *w2 = wbuf + (size_t)(2 < nr ? 2 : nr - 1) * K;
    const float *w3 = wbuf + (size_t)(3 < nr ? 3 : nr - 1) * K;
    const float *w4 = wbuf + (size_t)(4 < nr ? 4 : nr - 1) * K;
    const float *w5 = wbuf + (size_t)(5 < nr ? 5 : nr - 1) * K;
    for (int32_t g0 = lo - lo % NR; g0 < hi; g0 += NR) {
      vf16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0};
      const float *xp = XT + g0;
      for (int32_t h = 0; h < K; h++) {
        vf16 x = *(const vf16 *)(xp + (size_t)h * TILE);
        a0 += w0[h] * x;
        a1 += w1[h] * x;
        a2 += w2[h] * x;
        a3 += w3[h] * x;
        a4 += w4[h] * x;
        a5 += w5[h] * x;
      }
      vf16 acc[MR] = {a0, a1, a2, a3, a4, a5};
      int32_t l0 = lo > g0 ? lo - g0 : 0, l1 = hi < g0 + NR ? hi - g0 : NR;
      for (int32_t i = 0; i < nr; i++) {
        float *o = OUT + (size_t)(r0 + i) * TILE + g0;
        vf16 v = acc[i] * alpha;
        if (!accumulate) {
          *(vf16 *)o = v; /* whole group: lanes outside [lo, hi) are scratch */
        } else {
          for (int32_t c = l0; c < l1; c++) o[c] = accumulate ? o[c] + v[c] : v[c];
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
  float *xt = (float *)(sc + L->xt), *gut = (float *)(sc + L->gut), *ht = (float *)(sc + L->ht);
  float *wbuf = (float *)(sc + L->wbuf), *sh13t = (float *)(sc + L->sh13t);
  float *sh2t = (float *)(sc + L->sh2t), *yt = xt;
  const size_t H = (size_t)f->H, I = (size_t)f->I, I2 = 2 * I;
  const int32_t e = f->items[3 * item], start = f->items[3 * item + 1], n = f->items[3 * item + 2];
  const int32_t *pairs = f->sorted + start;
  const int32_t np = (n + NR - 1) / NR * NR; /* lanes computed; those past n are zero */

  /* gather x of the tile, feature-major, as fp32 */
  for (int32_t i = 0; i < n; i++) {
    const uint16_t *xr = f->x + (size_t)(pairs[i] / f->k) * H;
    for (size_t h = 0; h < H; h++) xt[h * TILE + (size_t)i] = bf16f(xr[h]);
  }
  for (size_t h = 0; h < H; h++)
    for (int32_t i = n; i < np; i++) xt[h * TILE + (size_t)i] = 0.0f;
  /* gu = W13_e x */
  gemm_tile(f->w13 + (size_t)e * I2 * H, H, (int32_t)I2, (int32_t)H, xt, 0, n, gut, 0, 1.0f, wbuf);

  const lmoe_pool *pool = f->plan->pool;
  const size_t R = (size_t)f->R, R13 = (size_t)f->R13;
  /* gate/up LoRA per run of consecutive tokens sharing a slot (requests are
     contiguous, so a tile has few runs): shrink, then expand into gate and up rows */
  if (f->lora) {
    for (int32_t s = 0; s < n;) {
      int32_t slot = f->slot_of[pairs[s] / f->k], len = 1;
      while (s + len < n && f->slot_of[pairs[s + len] / f->k] == slot) len++;
      const lmoe_slot *sl = slot >= 0 ? &pool->slots[slot] : NULL;
      if (sl && sl->r13 > 0) {
        const uint16_t *a13 = lmoe_slot_ptr(pool, slot, pool->off_a13) + (size_t)e * R13 * H;
        const uint16_t *b13 = lmoe_slot_ptr(pool, slot, pool->off_b13) + (size_t)e * I2 * R13;
        gemm_tile(a13, H, sl->r13, (int32_t)H, xt, s, s + len, sh13t, 0, 1.0f, wbuf);
        if (sl->g_hi > sl->g_lo)
          gemm_tile(b13 + sl->g_lo, R13, (int32_t)I, sl->g_hi - sl->g_lo,
                    sh13t + (size_t)sl->g_lo * TILE, s, s + len, gut, 1, sl->scale_gate, wbuf);
        if (sl->u_hi > sl->u_lo)
          gemm_tile(b13 + I * R13 + sl->u_lo, R13, (int32_t)I, sl->u_hi - sl->u_lo,
                    sh13t + (size_t)sl->u_lo * TILE, s, s + len, gut + I * TILE, 1, sl->scale_up,
                    wbuf);
      }
      s += len;
    }
  }
  /* h = silu(g) * u, stored as bf16 values (see the note at the top) */
  for (size_t c = 0; c < I; c++) {
    const float *g = gut + c * TILE, *u = gut + (I + c) * TILE;
    float *hr = ht + c * TILE;
    for (int32_t i = 0; i < np; i++) hr[i] = round_bf16(g[i] / (1.0f + expf(-g[i])) * u[i]);
  }
  /* y = W2_e h (+ down LoRA) */
  gemm_tile(f->w2 + (size_t)e * H * I, I, (int32_t)H, (int32_t)I, ht, 0, n, yt, 0, 1.0f, wbuf);
  if (f->lora) {
    for (int32_t s = 0; s < n;) {
      int32_t slot = f->slot_of[pairs[s] / f->k], len = 1;
      while (s + len < n && f->slot_of[pairs[s + len] / f->k] == slot) len++;
      const lmoe_slot *sl = slot >= 0 ? &pool->slots[slot] : NULL;
      if (sl && sl->r2 > 0) {
        const uint16_t *a2 = lmoe_slot_ptr(pool, slot, pool->off_a2) + (size_t)e * R * I;
        const uint16_t *b2 = lmoe_slot_ptr(pool, slot, pool->off_b2) + (size_t)e * H * R;
        gemm_tile(a2, I, sl->r2, (int32_t)I, ht, s, s + len, sh2t, 0, 1.0f, wbuf);
        gemm_tile(b2, R, (int32_t)H, sl->r2, sh2t, s, s + len, yt, 1, sl->scale_down, wbuf);
      }
      s += len;
    }
  }
  /* routed weight, into the pair's row of y */
  for (int32_t i = 0; i < n; i++) {
    float w = f->wts[pairs[i]];
    float *yr = f->y + (size_t)pairs[i] * H;
    for (size_t h = 0; h < H; h++) yr[h] = w * yt[h * TILE + (size_t)i];
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
