/* The float64 reference: the math of DESIGN.md in plain loops, in double, written
   independently of the backends (it shares only the bf16 conversion).

   It always applies each request's adapter: the guard mode decides how a backend
   finds out whether LoRA work is needed, never what the result is.
   It rounds h = silu(g)·u to bf16 before the down projection, because the backends
   store that intermediate in bf16 (see cpu_forward.c); everything else is exact
   double arithmetic on the stored bf16 values.

   Works for any backend: buffers are read through lmoe_buffer_read and the pool's
   storage through the backend's blocking copy, after the stream has finished. One
   expert's weights are held in double at a time, so memory stays bounded. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Copies device (or host) bytes to host memory, after the context's stream is idle. */
static lmoe_status fetch(lmoe_context *ctx, void *dst, const void *src, size_t bytes) {
  if (ctx->ops->caps.host_memory) {
    memcpy(dst, src, bytes);
    return LMOE_OK;
  }
  ctx->counters.host_waits++;
  ctx->counters.downloads++;
  return ctx->ops->copy(ctx, dst, LMOE_MEMORY_HOST, src, LMOE_MEMORY_DEVICE, bytes, ctx->stream, 1);
}

/* An FP8 layer's expert e, read as its codes' values, times each element's block
   scale: w = code * scale, exact in double (docs/formats.md, "FP8"). */
static lmoe_status dequantize(const lmoe_layer *l, size_t e, double *w13, double *w2) {
  const size_t H = (size_t)l->cfg.hidden, I = (size_t)l->cfg.intermediate;
  const size_t nbh = (size_t)lmoe_fp8_blocks((int64_t)H), nbi = (size_t)lmoe_fp8_blocks((int64_t)I), B = LMOE_FP8_BLOCK;
  double *s13 = malloc(2 * nbi * nbh * sizeof *s13), *s2 = malloc(nbh * nbi * sizeof *s2);
  lmoe_status st = s13 && s2 ? LMOE_OK : lmoe_fail(l->ctx, LMOE_ERR_OUT_OF_MEMORY, "reference: out of host memory");
  if (!st) st = lmoe_buffer_read(l->w13s, (int64_t)(e * 2 * nbi * nbh), s13, LMOE_DTYPE_F64, (int64_t)(2 * nbi * nbh));
  if (!st) st = lmoe_buffer_read(l->w2s, (int64_t)(e * nbh * nbi), s2, LMOE_DTYPE_F64, (int64_t)(nbh * nbi));
  if (!st) {
    for (size_t o = 0; o < 2 * I; o++) { /* gate rows, then up rows: each part blocked on its own */
      size_t part = o / I, r = o % I;
      for (size_t q = 0; q < H; q++) w13[o * H + q] *= s13[(part * nbi + r / B) * nbh + q / B];
    }
    for (size_t o = 0; o < H; o++)
      for (size_t q = 0; q < I; q++) w2[o * I + q] *= s2[(o / B) * nbi + q / B];
  }
  free(s13), free(s2);
  return st;
}

static double bf(const uint16_t *p, size_t i) { return (double)lmoe_bf16_to_f32(p[i]); }

lmoe_status lmoe_reference_forward(lmoe_context *ctx, const lmoe_forward_args *args) {
  lmoe_forward_plan plan;
  lmoe_status st = lmoe_forward_validate(ctx, args, &plan, true);
  if (st) return st;
  if (plan.layer->cfg.shard_size > 1)
    return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED,
                     "the reference computes whole layers; this one is rank %d of %d (shard_size): compare "
                     "the ranks' summed output with an unsharded layer's reference",
                     (int)plan.layer->cfg.shard_rank, (int)plan.layer->cfg.shard_size);
  if (!ctx->ops->caps.synchronous) {
    ctx->counters.host_waits++;
    st = ctx->ops->synchronize(ctx, ctx->stream);
    if (st) return st;
  }
  const lmoe_layer_config *c = &plan.layer->cfg;
  const lmoe_pool *pool = plan.pool;
  const size_t M = (size_t)plan.M, E = (size_t)c->num_experts, H = (size_t)c->hidden;
  const size_t I = (size_t)c->intermediate, K = (size_t)c->top_k;
  const size_t R = pool ? (size_t)pool->cfg.max_rank : 0, R13 = 2 * R;

  double *x = NULL, *out = NULL, *route = NULL, *w13 = NULL, *w2 = NULL, *gu = NULL, *h = NULL;
  double *y = NULL, *sh = NULL, *wt = NULL;
  int32_t *ids = NULL, *tok_slot = NULL;
  uint16_t **slot_img = NULL;
  size_t nslots = pool ? (size_t)pool->cfg.num_slots : 0;
  size_t route_n = plan.logits ? M * E : 1;
#define REF_ALLOC(p, n)                                                             \
  do {                                                                              \
    (p) = calloc((n) > 0 ? (n) : 1, sizeof *(p));                                     \
    if (!(p)) {                                                                     \
      st = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "reference: out of host memory"); \
      goto done;                                                                    \
    }                                                                               \
  } while (0)
  REF_ALLOC(x, M * H);
  REF_ALLOC(out, M * H);
  REF_ALLOC(route, route_n);
  REF_ALLOC(ids, M * K);
  REF_ALLOC(wt, M * K);
  REF_ALLOC(tok_slot, M);
  REF_ALLOC(w13, 2 * I * H);
  REF_ALLOC(w2, H * I);
  REF_ALLOC(gu, 2 * I);
  REF_ALLOC(h, I);
  REF_ALLOC(y, H);
  REF_ALLOC(sh, R13 + 1);
  if (nslots) REF_ALLOC(slot_img, nslots);

  if ((st = lmoe_buffer_read((lmoe_buffer *)plan.x, 0, x, LMOE_DTYPE_F64, (int64_t)(M * H))))
    goto done;

  /* routing */
  if (plan.logits) {
    if ((st = lmoe_buffer_read((lmoe_buffer *)plan.logits, 0, route, LMOE_DTYPE_F64,
                               (int64_t)(M * E))))
      goto done;
    for (size_t t = 0; t < M; t++) {
      const double *l = route + t * E;
      double mx = -INFINITY, sum = 0, sel_sum = 0;
      for (size_t e = 0; e < E; e++) mx = l[e] > mx ? l[e] : mx;
      for (size_t e = 0; e < E; e++) sum += exp(l[e] - mx);
      /* k passes of "largest not yet taken", lowest id first on ties */
      for (size_t j = 0; j < K; j++) {
        int32_t best = -1;
        for (size_t e = 0; e < E; e++) {
          bool taken = false;
          for (size_t q = 0; q < j; q++) taken |= ids[t * K + q] == (int32_t)e;
          if (!taken && (best < 0 || l[e] > l[best])) best = (int32_t)e;
        }
        ids[t * K + j] = best;
        wt[t * K + j] = exp(l[best] - mx);
        sel_sum += wt[t * K + j];
      }
      double den = c->renormalize ? sel_sum : sum;
      for (size_t j = 0; j < K; j++) wt[t * K + j] /= den;
    }
  } else {
    if ((st = lmoe_buffer_read((lmoe_buffer *)plan.topk_ids, 0, ids, LMOE_DTYPE_I32,
                               (int64_t)(M * K))) ||
        (st = lmoe_buffer_read((lmoe_buffer *)plan.topk_w, 0, wt, LMOE_DTYPE_F64, (int64_t)(M * K))))
      goto done;
    for (size_t i = 0; i < M * K; i++)
      if (ids[i] < 0 || (size_t)ids[i] >= E) {
        st = lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                       "topk_ids of token %zu (position %zu) is %d; experts are 0..%zu", i / K, i % K,
                       (int)ids[i], E - 1);
        goto done;
      }
  }

  /* the adapter of each token, and the images of the slots in use */
  for (size_t t = 0; t < M; t++) tok_slot[t] = LMOE_NO_ADAPTER;
  const int32_t *off = lmoe_meta_offsets(plan.meta);
  for (int32_t r = 0; r < lmoe_meta_requests(plan.meta); r++)
    for (int32_t t = off[r]; t < off[r + 1]; t++) tok_slot[t] = lmoe_meta_request_slot(plan.meta, r);
  for (size_t t = 0; t < M; t++) {
    int32_t s = tok_slot[t];
    if (s < 0 || slot_img[s]) continue;
    slot_img[s] = malloc(pool->slot_bytes);
    if (!slot_img[s]) {
      st = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "reference: out of host memory");
      goto done;
    }
    if ((st = fetch(ctx, slot_img[s], lmoe_slot_ptr(pool, s, 0), pool->slot_bytes))) goto done;
  }

  for (size_t e = 0; e < E; e++) {
    bool used = false;
    for (size_t i = 0; i < M * K && !used; i++) used = (size_t)ids[i] == e;
    if (!used) continue;
    if ((st = lmoe_buffer_read(plan.layer->w13, (int64_t)(e * 2 * I * H), w13, LMOE_DTYPE_F64,
                               (int64_t)(2 * I * H))) ||
        (st = lmoe_buffer_read(plan.layer->w2, (int64_t)(e * H * I), w2, LMOE_DTYPE_F64,
                               (int64_t)(H * I))))
      goto done;
    if (plan.layer->w13s && (st = dequantize(plan.layer, e, w13, w2))) goto done;
    for (size_t t = 0; t < M; t++) {
      for (size_t j = 0; j < K; j++) {
        if ((size_t)ids[t * K + j] != e) continue;
        const double *xt = x + t * H;
        int32_t s = tok_slot[t];
        const lmoe_slot *sl = s >= 0 ? &pool->slots[s] : NULL;
        const uint8_t *img = s >= 0 ? (const uint8_t *)slot_img[s] : NULL;
        for (size_t o = 0; o < 2 * I; o++) {
          double acc = 0;
          for (size_t q = 0; q < H; q++) acc += w13[o * H + q] * xt[q];
          gu[o] = acc;
        }
        if (sl && sl->r13 > 0) {
          const uint16_t *a13 = (const uint16_t *)(img + pool->off_a13) + e * R13 * H;
          const uint16_t *b13 = (const uint16_t *)(img + pool->off_b13) + e * 2 * I * R13;
          for (size_t q = 0; q < (size_t)sl->r13; q++) {
            double acc = 0;
            for (size_t p = 0; p < H; p++) acc += bf(a13, q * H + p) * xt[p];
            sh[q] = acc;
          }
          for (size_t o = 0; o < I; o++) {
            double ag = 0, au = 0;
            for (int32_t q = sl->g_lo; q < sl->g_hi; q++) ag += bf(b13, o * R13 + (size_t)q) * sh[q];
            for (int32_t q = sl->u_lo; q < sl->u_hi; q++)
              au += bf(b13, (I + o) * R13 + (size_t)q) * sh[q];
            gu[o] += sl->scale_gate * ag;
            gu[I + o] += sl->scale_up * au;
          }
        }
        for (size_t o = 0; o < I; o++) {
          double g = gu[o], u = gu[I + o];
          h[o] = (double)lmoe_bf16_to_f32(lmoe_f32_to_bf16((float)(g / (1.0 + exp(-g)) * u)));
        }
        for (size_t o = 0; o < H; o++) {
          double acc = 0;
          for (size_t q = 0; q < I; q++) acc += w2[o * I + q] * h[q];
          y[o] = acc;
        }
        if (sl && sl->r2 > 0) {
          const uint16_t *a2 = (const uint16_t *)(img + pool->off_a2) + e * R * I;
          const uint16_t *b2 = (const uint16_t *)(img + pool->off_b2) + e * H * R;
          for (size_t q = 0; q < (size_t)sl->r2; q++) {
            double acc = 0;
            for (size_t p = 0; p < I; p++) acc += bf(a2, q * I + p) * h[p];
            sh[q] = acc;
          }
          for (size_t o = 0; o < H; o++) {
            double acc = 0;
            for (size_t q = 0; q < (size_t)sl->r2; q++) acc += bf(b2, o * R + q) * sh[q];
            y[o] += sl->scale_down * acc;
          }
        }
        for (size_t o = 0; o < H; o++) out[t * H + o] += wt[t * K + j] * y[o];
      }
    }
  }
  st = lmoe_buffer_write(plan.out, 0, out, LMOE_DTYPE_F64, (int64_t)(M * H));

done:
#undef REF_ALLOC
  if (slot_img)
    for (size_t s = 0; s < nslots; s++) free(slot_img[s]);
  free(slot_img);
  free(x), free(out), free(route), free(w13), free(w2), free(gu), free(h), free(y), free(sh);
  free(wt), free(ids), free(tok_slot);
  return st;
}
