/* Shared pieces of the GPU tests: a layer with known weights, adapters with known
   weights, and an independent float64 host computation of the forward to compare with. */
#ifndef LMOE_GPU_COMMON_H
#define LMOE_GPU_COMMON_H

#include "../test_util.h"

#include <cuda_runtime_api.h>


/* float rounded to the nearest bf16 (ties to even), so host arrays hold exactly what
   the device stores */
static float bfr(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return f;
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  memcpy(&f, &u, 4);
  return f;
}

static float urand(float lo, float hi) {
  return lo + (hi - lo) * (float)((test_rand() >> 11) * (1.0 / 9007199254740992.0));
}

typedef struct host_part {
  int rank;
  float scale;
  float *a, *b; /* PEFT layout per expert: a [E, r, in], b [E, out, r] */
} host_part;

typedef struct host_adapter {
  int loaded, fused;
  host_part gate, up, gate_up, down;
} host_adapter;

typedef struct gpu_case {
  lmoe_context *ctx;
  lmoe_layer *layer;
  lmoe_pool *pool;
  lmoe_batch *batch;
  lmoe_buffer *x, *logits, *ids, *tw, *out;
  int E, H, I, k, renorm, M, S, R, logits_bf16;
  float *hx, *hlogits, *hw13, *hw2;
  int *hids;
  float *htw;
  host_adapter *ad; /* [S] */
  int nreq;
  int *req_tok, *req_slot;
} gpu_case;

static void part_make(host_part *p, int E, int in, int out, int rank, float sa, float sb, float scale) {
  p->rank = rank;
  p->scale = scale;
  p->a = malloc(sizeof(float) * (size_t)E * rank * in);
  p->b = malloc(sizeof(float) * (size_t)E * out * rank);
  for (size_t i = 0; i < (size_t)E * rank * in; i++) p->a[i] = bfr(urand(-sa, sa));
  for (size_t i = 0; i < (size_t)E * out * rank; i++) p->b[i] = bfr(urand(-sb, sb));
}

static void part_free(host_part *p) {
  free(p->a);
  free(p->b);
  memset(p, 0, sizeof *p);
}

/* Loads an adapter into slot s: targets mask, fused or not, ranks per part. */
static void case_load_adapter(gpu_case *c, int s, int targets, int fused, int rg, int ru, int rd) {
  host_adapter *a = &c->ad[s];
  part_free(&a->gate);
  part_free(&a->up);
  part_free(&a->gate_up);
  part_free(&a->down);
  a->fused = fused;
  float sa = 1.0f / sqrtf((float)c->H), sa2 = 1.0f / sqrtf((float)c->I);
  lmoe_adapter_desc d;
  lmoe_adapter_desc_init(&d);
  d.dtype = LMOE_DTYPE_F32;
  if (fused) {
    part_make(&a->gate_up, c->E, c->H, 2 * c->I, rg, sa * 2, 0.5f, urand(0.5f, 2.0f) / (float)rg);
    d.gate_up = (lmoe_lora_part){a->gate_up.a, a->gate_up.b, rg, a->gate_up.scale};
  } else {
    if (targets & LMOE_TARGET_GATE) {
      part_make(&a->gate, c->E, c->H, c->I, rg, sa * 2, 0.5f, urand(0.5f, 2.0f) / (float)rg);
      d.gate = (lmoe_lora_part){a->gate.a, a->gate.b, rg, a->gate.scale};
    }
    if (targets & LMOE_TARGET_UP) {
      part_make(&a->up, c->E, c->H, c->I, ru, sa * 2, 0.5f, urand(0.5f, 2.0f) / (float)ru);
      d.up = (lmoe_lora_part){a->up.a, a->up.b, ru, a->up.scale};
    }
  }
  if (targets & LMOE_TARGET_DOWN) {
    part_make(&a->down, c->E, c->I, c->H, rd, sa2 * 2, 0.5f, urand(0.5f, 2.0f) / (float)rd);
    d.down = (lmoe_lora_part){a->down.a, a->down.b, rd, a->down.scale};
  }
  OK(c->ctx, lmoe_pool_load(c->pool, s, &d));
  a->loaded = 1;
}

/* A layer with random weights (read back so the host knows them exactly), x, routing
   (logits, or given ids/weights), an out buffer, a pool of S slots, a batch. */
static void case_init(gpu_case *c, lmoe_context *ctx, int E, int H, int I, int k, int M, int S, int R,
                      int given_routing, int logits_bf16) {
  memset(c, 0, sizeof *c);
  c->ctx = ctx;
  c->E = E, c->H = H, c->I = I, c->k = k, c->M = M, c->S = S, c->R = R;
  c->renorm = (int)(test_rand() & 1);
  c->logits_bf16 = logits_bf16;
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = E, lc.hidden = H, lc.intermediate = I, lc.top_k = k, lc.renormalize = c->renorm;
  lc.max_tokens = M + (int)(test_rand() % 7);
  OK(ctx, lmoe_layer_create(ctx, &lc, &c->layer));
  float ws = 1.5f / sqrtf((float)H), ws2 = 1.5f / sqrtf((float)I);
  lmoe_buffer *w13, *w2;
  OK(ctx, lmoe_layer_weights(c->layer, 0, &w13));
  OK(ctx, lmoe_layer_weights(c->layer, 1, &w2));
  OK(ctx, lmoe_buffer_fill_random(w13, test_rand(), -ws, ws, NULL));
  OK(ctx, lmoe_buffer_fill_random(w2, test_rand(), -ws2, ws2, NULL));
  c->hw13 = malloc(sizeof(float) * (size_t)E * 2 * I * H);
  c->hw2 = malloc(sizeof(float) * (size_t)E * H * I);
  OK(ctx, lmoe_buffer_read(w13, 0, c->hw13, LMOE_DTYPE_F32, (int64_t)E * 2 * I * H));
  OK(ctx, lmoe_buffer_read(w2, 0, c->hw2, LMOE_DTYPE_F32, (int64_t)E * H * I));
  int64_t sx[2] = {M, H}, sl[2] = {M, E}, sk[2] = {M, k};
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &c->x));
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &c->out));
  OK(ctx, lmoe_buffer_fill_random(c->x, test_rand(), -1.0f, 1.0f, NULL));
  c->hx = malloc(sizeof(float) * (size_t)M * H + 4);
  OK(ctx, lmoe_buffer_read(c->x, 0, c->hx, LMOE_DTYPE_F32, (int64_t)M * H));
  if (!given_routing) {
    OK(ctx, lmoe_buffer_create(ctx, logits_bf16 ? LMOE_DTYPE_BF16 : LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE,
                               2, sl, &c->logits));
    OK(ctx, lmoe_buffer_fill_random(c->logits, test_rand(), -3.0f, 3.0f, NULL));
    c->hlogits = malloc(sizeof(float) * (size_t)M * E + 4);
    OK(ctx, lmoe_buffer_read(c->logits, 0, c->hlogits, LMOE_DTYPE_F32, (int64_t)M * E));
  } else {
    OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_I32, LMOE_MEMORY_DEVICE, 2, sk, &c->ids));
    OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE, 2, sk, &c->tw));
    c->hids = malloc(sizeof(int) * (size_t)M * k + 4);
    c->htw = malloc(sizeof(float) * (size_t)M * k + 4);
  }
  if (S > 0) {
    lmoe_pool_config pc;
    lmoe_pool_config_init(&pc);
    pc.num_slots = S, pc.max_rank = R;
    OK(ctx, lmoe_pool_create(c->layer, &pc, &c->pool));
    c->ad = calloc((size_t)S, sizeof *c->ad);
  }
  OK(ctx, lmoe_batch_create(ctx, &c->batch));
  c->req_tok = malloc(sizeof(int) * (size_t)(M + 8));
  c->req_slot = malloc(sizeof(int) * (size_t)(M + 8));
}

/* Given routing: `mode` 0 random distinct experts, 1 every token on expert 0 first. */
static void case_set_routing(gpu_case *c, int mode) {
  for (int t = 0; t < c->M; t++) {
    for (int j = 0; j < c->k; j++) {
      int e;
      bool dup;
      do {
        e = mode == 1 ? j : (int)(test_rand() % (uint64_t)c->E);
        dup = false;
        for (int q = 0; q < j; q++) dup |= c->hids[t * c->k + q] == e;
      } while (dup);
      c->hids[t * c->k + j] = e;
      c->htw[t * c->k + j] = urand(0.1f, 1.0f);
    }
  }
  OK(c->ctx, lmoe_buffer_write(c->ids, 0, c->hids, LMOE_DTYPE_I32, (int64_t)c->M * c->k));
  OK(c->ctx, lmoe_buffer_write(c->tw, 0, c->htw, LMOE_DTYPE_F32, (int64_t)c->M * c->k));
}

/* Splits the M tokens into n requests (some may be empty) on the given slots. */
static void case_set_batch(gpu_case *c, int n, const int *slots) {
  int left = c->M;
  for (int i = 0; i < n; i++) {
    int t = i == n - 1 ? left : (int)(test_rand() % (uint64_t)(left + 1));
    if (i < n - 1 && (test_rand() & 1)) t = left / (n - i);
    c->req_tok[i] = t;
    c->req_slot[i] = slots[i];
    left -= t;
  }
  c->nreq = n;
  OK(c->ctx, lmoe_batch_set(c->batch, c->pool, n, c->req_tok, c->req_slot));
}

/* The context's host waits told apart (forced, backpressure). */
static lmoe_wait_counters wait_counters(lmoe_context *ctx) {
  lmoe_wait_counters w;
  memset(&w, 0, sizeof w);
  w.struct_size = sizeof w;
  OK(ctx, lmoe_context_wait_counters(ctx, &w));
  return w;
}

static void case_args(gpu_case *c, lmoe_forward_args *a) {
  lmoe_forward_args_init(a);
  a->layer = c->layer;
  a->pool = c->pool;
  a->batch = c->batch;
  a->x = c->x;
  a->router_logits = c->logits;
  a->topk_ids = c->logits ? NULL : c->ids;
  a->topk_weights = c->logits ? NULL : c->tw;
  a->out = c->out;
}

/* y += scale * B (A v) for one expert of a part: a [r, in], b [out, r] (already offset). */
static void lora_apply(double *y, const float *a, const float *b, int r, int in, int out, double scale,
                       const double *v) {
  double t[1024];
  for (int i = 0; i < r; i++) {
    double s = 0;
    for (int j = 0; j < in; j++) s += (double)a[(size_t)i * in + j] * v[j];
    t[i] = s;
  }
  for (int o = 0; o < out; o++) {
    double s = 0;
    for (int i = 0; i < r; i++) s += (double)b[(size_t)o * r + i] * t[i];
    y[o] += scale * s;
  }
}

/* The forward in float64 on the host, written from the math in DESIGN.md. use_lora 0
   leaves the adapters out (to show they matter). out [M, H]. */
static void case_reference(const gpu_case *c, double *out, int use_lora) {
  int E = c->E, H = c->H, I = c->I, k = c->k;
  double *xv = malloc(sizeof(double) * H), *gu = malloc(sizeof(double) * 2 * I);
  double *hv = malloc(sizeof(double) * I), *yv = malloc(sizeof(double) * H);
  double *p = malloc(sizeof(double) * E);
  int ids[64];
  double w[64];
  int req = 0, req_end = c->nreq ? c->req_tok[0] : 0;
  for (int t = 0; t < c->M; t++) {
    while (req < c->nreq - 1 && t >= req_end) req_end += c->req_tok[++req];
    int slot = c->nreq ? c->req_slot[req] : -1;
    for (int j = 0; j < H; j++) xv[j] = c->hx[(size_t)t * H + j];
    if (c->hlogits) {
      double mx = -1e300, sum = 0;
      for (int e = 0; e < E; e++) mx = fmax(mx, c->hlogits[(size_t)t * E + e]);
      for (int e = 0; e < E; e++) sum += p[e] = exp(c->hlogits[(size_t)t * E + e] - mx);
      double ws = 0;
      for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
          bool taken = false;
          for (int q = 0; q < j; q++) taken |= ids[q] == e;
          if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        ids[j] = best;
        w[j] = p[best] / sum;
        ws += w[j];
      }
      if (c->renorm)
        for (int j = 0; j < k; j++) w[j] /= ws;
    } else {
      for (int j = 0; j < k; j++) {
        ids[j] = c->hids[t * k + j];
        w[j] = c->htw[t * k + j];
      }
    }
    for (int o = 0; o < H; o++) out[(size_t)t * H + o] = 0;
    for (int j = 0; j < k; j++) {
      int e = ids[j];
      const float *w13 = c->hw13 + (size_t)e * 2 * I * H, *w2 = c->hw2 + (size_t)e * H * I;
      for (int n = 0; n < 2 * I; n++) {
        double s = 0;
        for (int q = 0; q < H; q++) s += (double)w13[(size_t)n * H + q] * xv[q];
        gu[n] = s;
      }
      const host_adapter *a = use_lora && slot >= 0 ? &c->ad[slot] : NULL;
      if (a) {
        if (a->gate_up.rank) {
          int r = a->gate_up.rank;
          lora_apply(gu, a->gate_up.a + (size_t)e * r * H, a->gate_up.b + (size_t)e * 2 * I * r, r, H,
                     2 * I, a->gate_up.scale, xv);
        }
        if (a->gate.rank) {
          int r = a->gate.rank;
          lora_apply(gu, a->gate.a + (size_t)e * r * H, a->gate.b + (size_t)e * I * r, r, H, I,
                     a->gate.scale, xv);
        }
        if (a->up.rank) {
          int r = a->up.rank;
          lora_apply(gu + I, a->up.a + (size_t)e * r * H, a->up.b + (size_t)e * I * r, r, H, I,
                     a->up.scale, xv);
        }
      }
      for (int i = 0; i < I; i++) hv[i] = gu[i] / (1 + exp(-gu[i])) * gu[I + i];
      for (int o = 0; o < H; o++) {
        double s = 0;
        for (int i = 0; i < I; i++) s += (double)w2[(size_t)o * I + i] * hv[i];
        yv[o] = s;
      }
      if (a && a->down.rank) {
        int r = a->down.rank;
        lora_apply(yv, a->down.a + (size_t)e * r * I, a->down.b + (size_t)e * H * r, r, I, H,
                   a->down.scale, hv);
      }
      for (int o = 0; o < H; o++) out[(size_t)t * H + o] += w[j] * yv[o];
    }
  }
  free(xv), free(gu), free(hv), free(yv), free(p);
}

/* rel L2 of the device out against a host double array; counts non-finite values. */
static double case_compare(gpu_case *c, const double *ref, int64_t *nonfinite) {
  size_t n = (size_t)c->M * c->H;
  float *o = malloc(sizeof(float) * n + 4);
  OK(c->ctx, lmoe_buffer_read(c->out, 0, o, LMOE_DTYPE_F32, (int64_t)n));
  double num = 0, den = 0;
  *nonfinite = 0;
  for (size_t i = 0; i < n; i++) {
    if (!isfinite(o[i])) {
      (*nonfinite)++;
      continue;
    }
    double d = o[i] - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
  }
  free(o);
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

static double rel_diff(const double *a, const double *b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

static void case_free(gpu_case *c) {
  for (int s = 0; s < c->S; s++) {
    part_free(&c->ad[s].gate);
    part_free(&c->ad[s].up);
    part_free(&c->ad[s].gate_up);
    part_free(&c->ad[s].down);
  }
  free(c->ad);
  lmoe_batch_release(c->batch);
  lmoe_pool_release(c->pool);
  lmoe_buffer_release(c->x);
  lmoe_buffer_release(c->out);
  lmoe_buffer_release(c->logits);
  lmoe_buffer_release(c->ids);
  lmoe_buffer_release(c->tw);
  lmoe_layer_release(c->layer);
  free(c->hx), free(c->hlogits), free(c->hw13), free(c->hw2), free(c->hids), free(c->htw);
  free(c->req_tok), free(c->req_slot);
  memset(c, 0, sizeof *c);
}

static void desc_part(lmoe_lora_part *d, const host_part *p) {
  if (!p->rank) return;
  d->a = p->a, d->b = p->b, d->rank = p->rank, d->scale = p->scale;
}

/* The same forward on the cpu backend: same weights, inputs, routing, adapters, batch. */
static void cpu_mirror_forward(const gpu_case *c, double *out) {
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.backend = LMOE_BACKEND_CPU;
  lmoe_context *ctx = NULL;
  char err[256];
  if (lmoe_context_create(&cfg, &ctx, err, sizeof err)) {
    fprintf(stderr, "cpu context: %s\n", err);
    exit(1);
  }
  lmoe_layer_config lc;
  lmoe_layer_get_config(c->layer, &lc);
  lmoe_layer *layer = NULL;
  OK(ctx, lmoe_layer_create(ctx, &lc, &layer));
  OK(ctx, lmoe_layer_set_weights(layer, c->hw13, c->hw2, LMOE_DTYPE_F32));
  lmoe_pool *pool = NULL;
  if (c->S) {
    lmoe_pool_config pc;
    lmoe_pool_get_config(c->pool, &pc);
    OK(ctx, lmoe_pool_create(layer, &pc, &pool));
    for (int s = 0; s < c->S; s++) {
      if (!c->ad[s].loaded) continue;
      lmoe_adapter_desc d;
      lmoe_adapter_desc_init(&d);
      d.dtype = LMOE_DTYPE_F32;
      desc_part(&d.gate, &c->ad[s].gate);
      desc_part(&d.up, &c->ad[s].up);
      desc_part(&d.gate_up, &c->ad[s].gate_up);
      desc_part(&d.down, &c->ad[s].down);
      OK(ctx, lmoe_pool_load(pool, s, &d));
    }
  }
  int64_t sx[2] = {c->M, c->H}, sl[2] = {c->M, c->E}, sk[2] = {c->M, c->k};
  lmoe_buffer *x = NULL, *o = NULL, *lg = NULL, *ids = NULL, *tw = NULL;
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &x));
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &o));
  OK(ctx, lmoe_buffer_write(x, 0, c->hx, LMOE_DTYPE_F32, (int64_t)c->M * c->H));
  lmoe_batch *b = NULL;
  OK(ctx, lmoe_batch_create(ctx, &b));
  OK(ctx, lmoe_batch_set(b, pool, c->nreq, c->req_tok, c->req_slot));
  lmoe_forward_args a;
  lmoe_forward_args_init(&a);
  a.layer = layer, a.pool = pool, a.batch = b, a.x = x, a.out = o;
  if (c->hlogits) {
    OK(ctx, lmoe_buffer_create(ctx, c->logits_bf16 ? LMOE_DTYPE_BF16 : LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE, 2, sl, &lg));
    OK(ctx, lmoe_buffer_write(lg, 0, c->hlogits, LMOE_DTYPE_F32, (int64_t)c->M * c->E));
    a.router_logits = lg;
  } else {
    OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_I32, LMOE_MEMORY_DEVICE, 2, sk, &ids));
    OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE, 2, sk, &tw));
    OK(ctx, lmoe_buffer_write(ids, 0, c->hids, LMOE_DTYPE_I32, (int64_t)c->M * c->k));
    OK(ctx, lmoe_buffer_write(tw, 0, c->htw, LMOE_DTYPE_F32, (int64_t)c->M * c->k));
    a.topk_ids = ids, a.topk_weights = tw;
  }
  OK(ctx, lmoe_forward(ctx, &a, NULL));
  OK(ctx, lmoe_buffer_read(o, 0, out, LMOE_DTYPE_F64, (int64_t)c->M * c->H));
  lmoe_buffer_release(x), lmoe_buffer_release(o), lmoe_buffer_release(lg);
  lmoe_buffer_release(ids), lmoe_buffer_release(tw);
  lmoe_batch_release(b);
  lmoe_pool_release(pool);
  lmoe_layer_release(layer);
  lmoe_context_release(ctx);
}

static lmoe_context *gpu_context_on(int guard, void *stream, int32_t device) {
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.backend = LMOE_BACKEND_CUDA;
  cfg.guard = guard;
  cfg.stream = stream;
  cfg.device = device;
  lmoe_context *ctx = NULL;
  char err[256];
  lmoe_status st = lmoe_context_create(&cfg, &ctx, err, sizeof err);
  if (st) {
    fprintf(stderr, "cuda context on device %d: %s: %s\n", (int)device, lmoe_status_string(st), err);
    exit(1);
  }
  return ctx;
}

static lmoe_context *gpu_context(int guard, void *stream) { return gpu_context_on(guard, stream, 0); }

#endif
