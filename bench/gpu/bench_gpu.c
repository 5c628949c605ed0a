/* GPU benchmark of one MoE layer with LoRA adapters (PERFORMANCE.md):
     bench_gpu [preset ...] [--m 512,2048,...] [--iters N] [--stack] [--csv file] [--fp8 | --fp8-only]
     bench_gpu --gemms [preset ...] [--m ...] [--csv file] [--fp8-only]
     bench_gpu --dense N
   presets: qwen3 (E128 H2048 I768 k8), mixtral (E8 H4096 I14336 k2).
   Per M and case: eager and CUDA-graph replay, median ms of >= 50 (CUDA events,
   input sets rotated), TFLOP/s and % of the floor. The floor's ceilings come from
   LMOE_PEAK_FLOPS and LMOE_PEAK_BYTES (bench/gpu/run.sh measures them in the same run;
   the defaults are an H200's), and for FP8 base GEMMs LMOE_PEAK_FLOPS_FP8 (default
   twice LMOE_PEAK_FLOPS, Hopper's e4m3 rate). --stack: the guard modes over a 48-layer
   qwen3 stack (host waits per forward, ms per forward).
   --fp8: after each preset's table, the same table for an FP8 layer of the preset (e4m3
   experts, float32 128x128 block scales; cases "fp8 no adapter" and "fp8 4 adapters
   r16"; codes random in [-448, 448), scales in [0.5, 1] * 0.02 / 448, so weights of the
   bf16 layer's magnitude). Its floor counts 1-byte weights and the base GEMMs at
   LMOE_PEAK_FLOPS_FP8, the adapters at LMOE_PEAK_FLOPS.
   --fp8-only: the FP8 tables alone (no bf16 table, early exit or stack).
   --gemms: the two expert GEMMs alone (gate_up + down, routing done once), on every
   engine the card runs, for comparison with torch._grouped_mm; with --fp8-only, the FP8
   engine's instead (x quantized once, h once after a first gate_up; the timing is
   gate_up + down on the quantized operands, as torch._scaled_grouped_mm's reference).
   --dense N: an N x N x N bf16 GEMM through each sm90 row, checked against float64
   (every element for N <= 512, else 4096 samples), TFLOP/s. */
#include "../bench_common.h"
#include "bench_gpu_common.h"
#include "gemm_engine.h"
#include "loramoe.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NSETS 3
static double PEAK_FLOPS = 771e12, PEAK_BYTES = 4.27e12, PEAK_FLOPS_FP8; /* set in main */

typedef struct bench {
  lmoe_context *ctx;
  cudaStream_t s;
  preset p;
  int maxM;
  lmoe_layer *layer;
  lmoe_pool *pool16, *poolmix;
  lmoe_batch *batch;
  lmoe_buffer *x[NSETS], *lg[NSETS], *out;
  FILE *csv;
  int fp8; /* the layer's experts are FP8 e4m3 with block scales */
} bench;

static lmoe_buffer *view(lmoe_context *ctx, lmoe_buffer *b, int rows, int cols, int dtype) {
  lmoe_buffer_desc d;
  lmoe_buffer_describe(b, &d);
  int64_t sh[2] = {rows, cols};
  lmoe_buffer *v = NULL;
  CK(ctx, lmoe_buffer_wrap(ctx, dtype, LMOE_MEMORY_DEVICE, 2, sh, d.data, &v));
  return v;
}

typedef struct bcase {
  const char *name;
  int pool; /* 0 none, 1 r16, 2 mixed */
  int slots[8];
  int rank_of[4];
} bcase;

static const bcase CASES[] = {
    {"no adapter", 0, {-1, -1, -1, -1, -1, -1, -1, -1}, {0, 0, 0, 0}},
    {"4 adapters r16", 1, {0, 1, 2, 3, 0, 1, 2, 3}, {16, 16, 16, 16}},
    {"half without", 1, {0, -1, 1, -1, 2, -1, 3, -1}, {16, 16, 16, 16}},
    {"mixed ranks 4-32", 2, {0, 1, 2, 3, 0, 1, 2, 3}, {4, 8, 16, 32}},
};

/* The adapters' share of case_flops. */
static double case_lora_flops(const preset *p, int M, const bcase *c) {
  double per_req = (double)M * p->k / 8, f = 0;
  for (int i = 0; i < 8; i++)
    if (c->slots[i] >= 0) f += per_req * 6.0 * c->rank_of[c->slots[i]] * (p->H + p->I);
  return f;
}

static double case_flops(const preset *p, int M, const bcase *c) {
  return (double)M * p->k * 6.0 * p->H * p->I + case_lora_flops(p, M, c);
}

/* fp8: 1-byte expert weights plus their float32 128x128 block scales. */
static double case_bytes(const preset *p, int M, const bcase *c, int fp8) {
  double nb = (double)((p->H + 127) / 128) * ((p->I + 127) / 128);
  double w = fp8 ? (double)p->E * 3 * p->H * p->I + (double)p->E * 3 * nb * 4 : (double)p->E * 3 * p->H * p->I * 2;
  double b = w + 2.0 * M * p->H * 2 + (double)M * p->E * 4;
  int seen[4] = {0};
  for (int i = 0; i < 8; i++) {
    int s = c->slots[i];
    if (s >= 0 && !seen[s]) {
      seen[s] = 1;
      b += (double)p->E * 6.0 * c->rank_of[s] * (p->H + p->I);
    }
  }
  return b;
}

static void setup(bench *b, const preset *p, int maxM, int fp8) {
  memset(b, 0, sizeof *b);
  b->p = *p;
  b->maxM = maxM;
  b->fp8 = fp8;
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.backend = LMOE_BACKEND_CUDA;
  char err[256];
  if (lmoe_context_create(&cfg, &b->ctx, err, sizeof err)) {
    fprintf(stderr, "context: %s\n", err);
    exit(1);
  }
  lmoe_context *ctx = b->ctx;
  b->s = lmoe_context_stream(ctx);
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = p->E, lc.hidden = p->H, lc.intermediate = p->I, lc.top_k = p->k;
  lc.max_tokens = maxM;
  if (fp8) lc.weight_dtype = LMOE_DTYPE_F8_E4M3;
  CK(ctx, lmoe_layer_create(ctx, &lc, &b->layer));
  if (fp8) {
    /* on the device (lmoe_layer_randomize of an FP8 layer is made on the host): codes
       uniform over e4m3's range, block scales near amax / 448 for |w| <= 0.02 */
    for (int w = 0; w < 4; w++) {
      lmoe_buffer *wb;
      CK(ctx, lmoe_layer_weights(b->layer, w, &wb));
      if (w < 2) CK(ctx, lmoe_buffer_fill_random(wb, 7 + w, -448.0f, 448.0f, NULL));
      else CK(ctx, lmoe_buffer_fill_random(wb, 7 + w, 0.5f * 0.02f / 448.0f, 0.02f / 448.0f, NULL));
    }
  } else {
    CK(ctx, lmoe_layer_randomize(b->layer, 7, 0.02f));
  }
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = 4, pc.max_rank = 16;
  CK(ctx, lmoe_pool_create(b->layer, &pc, &b->pool16));
  pc.max_rank = 32;
  CK(ctx, lmoe_pool_create(b->layer, &pc, &b->poolmix));
  for (int s = 0; s < 4; s++) {
    lmoe_random_adapter ra;
    lmoe_random_adapter_init(&ra);
    ra.targets = LMOE_TARGET_ALL;
    ra.rank = 16;
    ra.alpha = 32;
    ra.seed = 100 + s;
    CK(ctx, lmoe_pool_load_random(b->pool16, s, &ra));
    ra.rank = 4 << s;
    ra.seed = 200 + s;
    CK(ctx, lmoe_pool_load_random(b->poolmix, s, &ra));
  }
  CK(ctx, lmoe_batch_create(ctx, &b->batch));
  int64_t sx[2] = {maxM, p->H}, sl[2] = {maxM, p->E};
  for (int i = 0; i < NSETS; i++) {
    CK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &b->x[i]));
    CK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE, 2, sl, &b->lg[i]));
    CK(ctx, lmoe_buffer_fill_random(b->x[i], 11 + i, -1, 1, NULL));
    CK(ctx, lmoe_buffer_fill_random(b->lg[i], 21 + i, -2, 2, NULL));
  }
  CK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &b->out));
  CK(ctx, lmoe_context_synchronize(ctx, NULL));
}

static void teardown(bench *b) {
  for (int i = 0; i < NSETS; i++) lmoe_buffer_release(b->x[i]), lmoe_buffer_release(b->lg[i]);
  lmoe_buffer_release(b->out);
  lmoe_batch_release(b->batch);
  lmoe_pool_release(b->pool16);
  lmoe_pool_release(b->poolmix);
  lmoe_layer_release(b->layer);
  lmoe_context_release(b->ctx);
}

/* Median ms of `iters` forwards, eager (graph = 0) or graph replays (graph = 1). */
static double time_forward(bench *b, int M, lmoe_pool *pool, int graph, int iters) {
  lmoe_context *ctx = b->ctx;
  lmoe_forward_args a[NSETS];
  lmoe_buffer *views[NSETS * 2 + 1];
  int nv = 0;
  lmoe_buffer *ov = view(ctx, b->out, M, b->p.H, LMOE_DTYPE_BF16);
  for (int i = 0; i < NSETS; i++) {
    lmoe_forward_args_init(&a[i]);
    a[i].layer = b->layer;
    a[i].pool = pool;
    a[i].batch = b->batch;
    a[i].x = views[nv++] = view(ctx, b->x[i], M, b->p.H, LMOE_DTYPE_BF16);
    a[i].router_logits = views[nv++] = view(ctx, b->lg[i], M, b->p.E, LMOE_DTYPE_F32);
    a[i].out = ov;
  }
  cudaGraphExec_t ge[NSETS] = {0};
  if (graph) {
    for (int i = 0; i < NSETS; i++) {
      cudaGraph_t g;
      CU(cudaStreamBeginCapture(b->s, cudaStreamCaptureModeThreadLocal));
      CK(ctx, lmoe_forward(ctx, &a[i], NULL));
      CU(cudaStreamEndCapture(b->s, &g));
      CU(cudaGraphInstantiate(&ge[i], g, 0));
      cudaGraphDestroy(g);
    }
  }
  cudaEvent_t ev[2 * 256];
  if (iters > 256) iters = 256;
  for (int i = 0; i < 2 * iters; i++) CU(cudaEventCreate(&ev[i]));
  for (int w = 0; w < 5; w++) {
    if (graph) CU(cudaGraphLaunch(ge[w % NSETS], b->s));
    else CK(ctx, lmoe_forward(ctx, &a[w % NSETS], NULL));
  }
  for (int i = 0; i < iters; i++) {
    CU(cudaEventRecord(ev[2 * i], b->s));
    if (graph) CU(cudaGraphLaunch(ge[i % NSETS], b->s));
    else CK(ctx, lmoe_forward(ctx, &a[i % NSETS], NULL));
    CU(cudaEventRecord(ev[2 * i + 1], b->s));
  }
  CU(cudaStreamSynchronize(b->s));
  double t[256];
  for (int i = 0; i < iters; i++) {
    float ms;
    CU(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]));
    t[i] = ms;
  }
  for (int i = 0; i < 2 * iters; i++) cudaEventDestroy(ev[i]);
  for (int i = 0; i < NSETS; i++)
    if (ge[i]) cudaGraphExecDestroy(ge[i]);
  for (int i = 0; i < nv; i++) lmoe_buffer_release(views[i]);
  lmoe_buffer_release(ov);
  return median(t, iters);
}

static int only_case = -1, profile_only = 0;

static void run_preset(bench *b, const int *Ms, int nM, int iters) {
  const preset *p = &b->p;
  printf("\n### %s%s (E%d H%d I%d k%d)\n\n", p->name, b->fp8 ? ", FP8 e4m3 experts" : "", p->E, p->H, p->I,
         p->k);
  printf("| M | case | eager ms | graph ms | TFLOP/s (graph) | floor ms | %% of floor |\n");
  printf("|---|---|---|---|---|---|---|\n");
  for (int mi = 0; mi < nM; mi++) {
    int M = Ms[mi];
    if (M > b->maxM) continue;
    for (size_t ci = 0; ci < sizeof CASES / sizeof CASES[0]; ci++) {
      const bcase *c = &CASES[ci];
      if (only_case >= 0 && (int)ci != only_case) continue;
      if (b->fp8 && ci > 1) continue; /* FP8: no adapter and 4 adapters r16 only */
      lmoe_pool *pool = c->pool == 0 ? NULL : c->pool == 1 ? b->pool16 : b->poolmix;
      int tok[8];
      for (int i = 0; i < 8; i++) tok[i] = M / 8 + (i < M % 8);
      CK(b->ctx, lmoe_batch_set(b->batch, pool, 8, tok, c->slots));
      double te = time_forward(b, M, pool, 0, iters);
      if (profile_only) continue;
      double tg = time_forward(b, M, pool, 1, iters);
      double fl = case_flops(p, M, c), by = case_bytes(p, M, c, b->fp8), lf = case_lora_flops(p, M, c);
      double ft = b->fp8 ? (fl - lf) / PEAK_FLOPS_FP8 + lf / PEAK_FLOPS : fl / PEAK_FLOPS;
      double floor_ms = fmax(ft, by / PEAK_BYTES) * 1e3;
      char name[64];
      snprintf(name, sizeof name, "%s%s", b->fp8 ? "fp8 " : "", c->name);
      printf("| %d | %s | %.3f | %.3f | %.0f | %.3f | %.0f%% |\n", M, name, te, tg, fl / (tg * 1e-3) / 1e12,
             floor_ms, 100.0 * floor_ms / tg);
      fflush(stdout);
      if (b->csv)
        fprintf(b->csv, "%s,%d,%s,%.4f,%.4f,%.1f,%.4f\n", p->name, M, name, te, tg,
                fl / (tg * 1e-3) / 1e12, floor_ms);
    }
  }
}

/* (f) early exit: graph replay with guard always and no adapter vs guard host, no adapter. */
static void run_early_exit(bench *b, const int *Ms, int nM, int iters) {
  printf("\n### early exit: graph replay, no active adapter (%s)\n\n", b->p.name);
  printf("| M | guard host ms | guard always ms | overhead |\n|---|---|---|---|\n");
  int none[8] = {-1, -1, -1, -1, -1, -1, -1, -1};
  for (int mi = 0; mi < nM; mi++) {
    int M = Ms[mi];
    if (M > b->maxM) continue;
    int tok[8];
    for (int i = 0; i < 8; i++) tok[i] = M / 8 + (i < M % 8);
    CK(b->ctx, lmoe_batch_set(b->batch, b->pool16, 8, tok, none));
    lmoe_context_set_guard(b->ctx, LMOE_GUARD_HOST);
    double th = time_forward(b, M, b->pool16, 1, iters);
    lmoe_context_set_guard(b->ctx, LMOE_GUARD_ALWAYS);
    double ta = time_forward(b, M, b->pool16, 1, iters);
    lmoe_context_set_guard(b->ctx, LMOE_GUARD_HOST);
    printf("| %d | %.3f | %.3f | %+.1f%% |\n", M, th, ta, 100.0 * (ta - th) / th);
  }
}

/* Guard modes over a 48-layer stack (one layer's weights, 48 forwards ping-ponging x
   and out): host waits per stack forward and wall ms per stack forward. */
static void run_stack(bench *b, int M) {
  const int L = 48, reps = 10;
  printf("\n### guard modes, %d-layer %s stack, M=%d, half the requests on 4 adapters r16\n\n", L,
         b->p.name, M);
  printf("| guard | host waits / forward | ms / forward (wall) |\n|---|---|---|\n");
  int slots[8] = {0, -1, 1, -1, 2, -1, 3, -1}, tok[8];
  for (int i = 0; i < 8; i++) tok[i] = M / 8 + (i < M % 8);
  CK(b->ctx, lmoe_batch_set(b->batch, b->pool16, 8, tok, slots));
  lmoe_context *ctx = b->ctx;
  lmoe_buffer *xv = view(ctx, b->x[0], M, b->p.H, LMOE_DTYPE_BF16);
  lmoe_buffer *ov = view(ctx, b->out, M, b->p.H, LMOE_DTYPE_BF16);
  lmoe_buffer *lv = view(ctx, b->lg[0], M, b->p.E, LMOE_DTYPE_F32);
  const char *names[3] = {"host", "device_sync", "always"};
  for (int g = 0; g < 3; g++) {
    lmoe_context_set_guard(ctx, g);
    lmoe_forward_args a;
    lmoe_forward_args_init(&a);
    a.layer = b->layer, a.pool = b->pool16, a.batch = b->batch, a.router_logits = lv;
    double best = 1e30;
    lmoe_counters c0, c1;
    for (int r = 0; r < reps; r++) {
      CK(ctx, lmoe_context_synchronize(ctx, NULL));
      lmoe_context_counters(ctx, &c0);
      double t0 = now_s();
      for (int l = 0; l < L; l++) {
        a.x = l & 1 ? ov : xv;
        a.out = l & 1 ? xv : ov;
        CK(ctx, lmoe_forward(ctx, &a, NULL));
      }
      lmoe_context_counters(ctx, &c1);
      CK(ctx, lmoe_context_synchronize(ctx, NULL));
      double t = (now_s() - t0) * 1e3;
      if (r > 0 && t < best) best = t;
    }
    printf("| %s | %llu | %.2f |\n", names[g], (unsigned long long)(c1.host_waits - c0.host_waits), best);
  }
  lmoe_context_set_guard(ctx, LMOE_GUARD_HOST);
  /* restore x[0]: the stack overwrote it */
  CK(ctx, lmoe_buffer_fill_random(b->x[0], 11, -1, 1, NULL));
  lmoe_buffer_release(xv), lmoe_buffer_release(ov), lmoe_buffer_release(lv);
}

/* ------------------------------------------------------------------ --gemms, --dense */

static uint16_t f2bf_host(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}
static double bf2d(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* Median ms of n launches of fn (CUDA events around each). */
typedef cudaError_t (*stage_fn)(void *arg, cudaStream_t s);
static double time_stage(stage_fn fn, void *arg, cudaStream_t s, int iters) {
  cudaEvent_t ev[2 * 64];
  if (iters > 64) iters = 64;
  for (int i = 0; i < 2 * iters; i++) CU(cudaEventCreate(&ev[i]));
  for (int w = 0; w < 3; w++) CU(fn(arg, s));
  for (int i = 0; i < iters; i++) {
    CU(cudaEventRecord(ev[2 * i], s));
    CU(fn(arg, s));
    CU(cudaEventRecord(ev[2 * i + 1], s));
  }
  CU(cudaStreamSynchronize(s));
  double t[64];
  for (int i = 0; i < iters; i++) {
    float ms;
    CU(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]));
    t[i] = ms;
  }
  for (int i = 0; i < 2 * iters; i++) cudaEventDestroy(ev[i]);
  return median(t, iters);
}

static cudaError_t run_gemms(void *arg, cudaStream_t s) {
  const lmoe_fwd *f = arg;
  cudaError_t e = lmoe_k_gateup(f, 0, s);
  return e ? e : lmoe_k_down(f, 0, s);
}

static const char *engine_name(int engine) { return engine == LMOE_ENGINE_SM90 ? "sm90" : "sm80"; }

/* What both --gemms tables share: x and router logits as the layer benchmark has them,
   the workspace for the largest M (an FP8 layer's where fp8), a y of its own, a stream. */
typedef struct gemm_bench {
  int maxM;
  uint16_t *x, *out;
  float *lg;
  void *ws, *ybuf;
  size_t ws_bytes;
  cudaStream_t s;
} gemm_bench;

static void gemm_bench_open(gemm_bench *g, const preset *p, const int *Ms, int nM, int fp8) {
  g->maxM = 0;
  for (int i = 0; i < nM; i++) g->maxM = Ms[i] > g->maxM ? Ms[i] : g->maxM;
  const size_t maxM = (size_t)g->maxM;
  CU(cudaMalloc((void **)&g->x, maxM * p->H * 2));
  CU(cudaMalloc((void **)&g->out, maxM * p->H * 2));
  CU(cudaMalloc((void **)&g->lg, maxM * p->E * 4));
  CU(lmoe_k_fill_random(g->x, LMOE_DTYPE_BF16, (int64_t)maxM * p->H, 11, -1, 1, 0));
  CU(lmoe_k_fill_random(g->lg, LMOE_DTYPE_F32, (int64_t)maxM * p->E, 21, -2, 2, 0));
  lmoe_ws_layout L;
  lmoe_k_layout_fp8(g->maxM, p->E, p->H, p->I, p->k, 0, 0, fp8, &L);
  g->ws_bytes = L.total;
  CU(cudaMalloc(&g->ws, L.total));
  /* down's y apart from the workspace's region: there it would overwrite the sorted x
     (xg, or an FP8 layer's codes) that gate_up reads, and every timed run after the
     first would multiply down's outputs (wrong inputs, and other power draw, other
     clocks: gpu-notes 34) */
  CU(cudaMalloc(&g->ybuf, maxM * p->k * p->H * 2));
  CU(cudaStreamCreate(&g->s));
}

/* The routing of a planned forward, once, into the bench's own y */
static void gemm_bench_route(const gemm_bench *g, lmoe_fwd *f) {
  f->y = g->ybuf;
  CU(lmoe_k_route(f, g->s));
  CU(lmoe_k_scan(f, g->s));
  CU(lmoe_k_scatter(f, g->s));
}

static void gemm_bench_close(gemm_bench *g) {
  CU(cudaStreamDestroy(g->s));
  cudaFree(g->ws), cudaFree(g->ybuf), cudaFree(g->x), cudaFree(g->out), cudaFree(g->lg);
}

/* The expert GEMMs alone on the layer's shapes: random weights, x and router logits as
   the layer benchmark has them, the routing run once, then gate_up + down timed. */
static void run_gemms_preset(const preset *p, const int *Ms, int nM, int iters, FILE *csv) {
  lmoe_gemm_device dev;
  CU(lmoe_k_init(&dev));
  printf("\n### expert GEMMs alone: %s (gate_up + down, no adapter)\n\n", p->name);
  printf("| M | engine (row) | ms | TFLOP/s |\n|---|---|---|---|\n");
  size_t nw13 = (size_t)p->E * 2 * p->I * p->H, nw2 = (size_t)p->E * p->H * p->I;
  uint16_t *w13, *w2;
  CU(cudaMalloc((void **)&w13, nw13 * 2));
  CU(cudaMalloc((void **)&w2, nw2 * 2));
  CU(lmoe_k_fill_random(w13, LMOE_DTYPE_BF16, (int64_t)nw13, 7, -0.02f, 0.02f, 0));
  CU(lmoe_k_fill_random(w2, LMOE_DTYPE_BF16, (int64_t)nw2, 8, -0.02f, 0.02f, 0));
  gemm_bench g;
  gemm_bench_open(&g, p, Ms, nM, 0);
  for (int mi = 0; mi < nM; mi++) {
    for (int eng = 1; eng >= 0; eng--) {
      lmoe_gemm_device d = dev;
      if (eng == 1 && !dev.sm90) continue;
      d.sm90 = eng;
      lmoe_k_plan_args a = {.max_tokens = g.maxM, .E = p->E, .H = p->H, .I = p->I, .k = p->k, .renorm = 1,
                            .w13 = w13, .w2 = w2, .M = Ms[mi], .x = g.x, .out = g.out, .logits = g.lg,
                            .workspace = g.ws, .workspace_bytes = g.ws_bytes, .dev = &d};
      lmoe_fwd f;
      lmoe_k_plan(&a, &f);
      gemm_bench_route(&g, &f);
      /* x's rows in sorted order where the plan gathers them: before the timing, as the
         grouped GEMM reference gets its rows grouped (the layer's rows time the gather) */
      CU(lmoe_k_gather_x(&f, g.s));
      double ms = time_stage(run_gemms, &f, g.s, iters);
      double fl = (double)Ms[mi] * p->k * 6.0 * p->H * p->I;
      printf("| %d | %s (%d) | %.3f | %.0f |\n", Ms[mi], engine_name(f.engine), f.gemm_cfg, ms, fl / ms / 1e9);
      fflush(stdout);
      if (csv)
        fprintf(csv, "%s,%d,%s,%d,%.4f,%.1f\n", p->name, Ms[mi], engine_name(f.engine), f.gemm_cfg, ms,
                fl / ms / 1e9);
    }
  }
  gemm_bench_close(&g);
  cudaFree(w13), cudaFree(w2);
}

/* The FP8 engine's expert GEMMs alone: e4m3 weights and block scales as the FP8 layer
   table has them (--fp8), x quantized once; h (and its quantization) from a first
   gate_up; then gate_up + down timed on the quantized operands (run_gemms: an FP8
   plan's GEMM stages go to the FP8 engine). */
static void run_gemms_fp8_preset(const preset *p, const int *Ms, int nM, int iters, FILE *csv) {
  lmoe_gemm_device dev;
  CU(lmoe_k_init(&dev));
  int32_t avail = 0;
  CU(lmoe_k_fp8_init(&avail));
  printf("\n### expert GEMMs alone, FP8 e4m3: %s (gate_up + down, no adapter)\n\n", p->name);
  if (!avail) {
    printf("the FP8 engine does not run on this card or build\n");
    return;
  }
  printf("| M | ms | TFLOP/s | %% of the FP8 ceiling |\n|---|---|---|---|\n");
  const int nbh = (p->H + 127) / 128, nbi = (p->I + 127) / 128;
  size_t nw13 = (size_t)p->E * 2 * p->I * p->H, nw2 = (size_t)p->E * p->H * p->I;
  size_t ns13 = (size_t)p->E * 2 * nbi * nbh, ns2 = (size_t)p->E * nbh * nbi;
  uint8_t *w13, *w2;
  float *s13, *s2;
  CU(cudaMalloc((void **)&w13, nw13));
  CU(cudaMalloc((void **)&w2, nw2));
  CU(cudaMalloc((void **)&s13, ns13 * 4));
  CU(cudaMalloc((void **)&s2, ns2 * 4));
  CU(lmoe_k_fill_random(w13, LMOE_DTYPE_F8_E4M3, (int64_t)nw13, 7, -448.0f, 448.0f, 0));
  CU(lmoe_k_fill_random(w2, LMOE_DTYPE_F8_E4M3, (int64_t)nw2, 8, -448.0f, 448.0f, 0));
  CU(lmoe_k_fill_random(s13, LMOE_DTYPE_F32, (int64_t)ns13, 9, 0.5f * 0.02f / 448.0f, 0.02f / 448.0f, 0));
  CU(lmoe_k_fill_random(s2, LMOE_DTYPE_F32, (int64_t)ns2, 10, 0.5f * 0.02f / 448.0f, 0.02f / 448.0f, 0));
  gemm_bench g;
  gemm_bench_open(&g, p, Ms, nM, 1);
  for (int mi = 0; mi < nM; mi++) {
    lmoe_k_plan_args a = {.max_tokens = g.maxM, .E = p->E, .H = p->H, .I = p->I, .k = p->k, .renorm = 1,
                          .w13 = (const uint16_t *)w13, .w2 = (const uint16_t *)w2, .M = Ms[mi], .x = g.x,
                          .out = g.out, .logits = g.lg, .workspace = g.ws, .workspace_bytes = g.ws_bytes,
                          .dev = &dev, .fp8 = 1, .w13s = s13, .w2s = s2};
    lmoe_fwd f;
    lmoe_k_plan(&a, &f);
    gemm_bench_route(&g, &f);
    CU(lmoe_k_quant_x(&f, g.s));
    CU(lmoe_k_gateup(&f, 0, g.s));
    CU(lmoe_k_quant_h(&f, g.s));
    double ms = time_stage(run_gemms, &f, g.s, iters);
    double fl = (double)Ms[mi] * p->k * 6.0 * p->H * p->I, tf = fl / ms / 1e9;
    printf("| %d | %.3f | %.0f | %.0f%% |\n", Ms[mi], ms, tf, 100.0 * tf * 1e12 / PEAK_FLOPS_FP8);
    fflush(stdout);
    if (csv) fprintf(csv, "%s,%d,fp8,-1,%.4f,%.1f\n", p->name, Ms[mi], ms, tf);
  }
  gemm_bench_close(&g);
  cudaFree(w13), cudaFree(w2), cudaFree(s13), cudaFree(s2);
}

typedef struct dense_arg {
  int cfg, N;
  uint16_t *a, *b, *c;
  void *ws;
} dense_arg;
static cudaError_t run_dense(void *arg, cudaStream_t s) {
  dense_arg *d = arg;
  return lmoe_sm90_dense(d->cfg, d->N, d->N, d->N, d->a, d->b, d->c, d->ws, s);
}

/* Returns nonzero when a check fails. */
static int run_dense_all(int N, int iters) {
  lmoe_gemm_device dev;
  CU(lmoe_k_init(&dev));
  if (!dev.sm90) {
    printf("dense: the sm90 engine does not run on this card or build\n");
    return 0;
  }
  size_t n = (size_t)N * N;
  uint16_t *ha = malloc(n * 2), *hb = malloc(n * 2), *hc = malloc(n * 2);
  uint64_t st = 12345;
  for (size_t i = 0; i < n; i++) {
    st = st * 6364136223846793005ull + 1442695040888963407ull;
    ha[i] = f2bf_host((float)((double)(st >> 40) / (1 << 24) * 2 - 1));
    st = st * 6364136223846793005ull + 1442695040888963407ull;
    hb[i] = f2bf_host((float)((double)(st >> 40) / (1 << 24) * 2 - 1));
  }
  dense_arg d = {.N = N};
  CU(cudaMalloc((void **)&d.a, n * 2));
  CU(cudaMalloc((void **)&d.b, n * 2));
  CU(cudaMalloc((void **)&d.c, n * 2));
  CU(cudaMalloc(&d.ws, lmoe_sm90_dense_ws(N)));
  CU(cudaMemcpy(d.a, ha, n * 2, cudaMemcpyHostToDevice));
  CU(cudaMemcpy(d.b, hb, n * 2, cudaMemcpyHostToDevice));
  cudaStream_t s;
  CU(cudaStreamCreate(&s));
  int bad = 0;
  printf("\n### dense %d x %d x %d through the sm90 engine\n\n| row | ms | TFLOP/s | max rel err | checked |\n|---|---|---|---|---|\n",
         N, N, N);
  for (int cfg = 0; cfg < lmoe_gemm_nconfigs; cfg++) {
    if (lmoe_gemm_configs[cfg].engine != LMOE_ENGINE_SM90 || lmoe_gemm_configs[cfg].kind != LMOE_GEMM_EXPERT ||
        lmoe_gemm_configs[cfg].smem > dev.smem_optin)
      continue; /* the shrink rows compute the LoRA shrinks, not a GEMM of the dense kind */
    d.cfg = cfg;
    CU(cudaMemset(d.c, 0xff, n * 2)); /* NaN: an element never written shows */
    CU(run_dense(&d, s));
    CU(cudaStreamSynchronize(s));
    CU(cudaMemcpy(hc, d.c, n * 2, cudaMemcpyDeviceToHost));
    size_t checks = N <= 512 ? n : 4096;
    double worst = 0;
    for (size_t q = 0; q < checks; q++) {
      size_t idx = checks == n ? q : (size_t)((q * 2654435761u + 97) % n);
      size_t i = idx / N, j = idx % N;
      double ref = 0, mag = 0;
      for (int kk = 0; kk < N; kk++) {
        double t = bf2d(ha[i * N + kk]) * bf2d(hb[j * N + kk]);
        ref += t;
        mag += fabs(t);
      }
      double got = bf2d(hc[idx]), err = fabs(got - ref) / (mag > 0 ? mag : 1);
      if (got != got) err = 1e9; /* NaN: never written, or wrong */
      if (err > worst) worst = err;
    }
    double ms = time_stage(run_dense, &d, s, iters);
    double fl = 2.0 * N * (double)N * N;
    int ok = worst <= 8e-3; /* |err| relative to sum |a b|: bf16 output rounding ~4e-3 */
    bad |= !ok;
    printf("| %d | %.3f | %.0f | %.2e | %zu %s |\n", cfg, ms, fl / ms / 1e9, worst, checks, ok ? "ok" : "FAILED");
    fflush(stdout);
  }
  CU(cudaStreamDestroy(s));
  cudaFree(d.a), cudaFree(d.b), cudaFree(d.c), cudaFree(d.ws);
  free(ha), free(hb), free(hc);
  return bad;
}

int main(int argc, char **argv) {
  int Ms[16] = {512, 2048, 8192, 16384}, nM = 4, iters = 50, stack = 0, nsel = 0, gemms = 0, dense = 0;
  int fp8 = 0; /* 1: the FP8 tables after the bf16 ones; 2: the FP8 tables alone */
  const char *pf = getenv("LMOE_PEAK_FLOPS"), *pb = getenv("LMOE_PEAK_BYTES");
  if (pf && atof(pf) > 0) PEAK_FLOPS = atof(pf);
  if (pb && atof(pb) > 0) PEAK_BYTES = atof(pb);
  const char *pf8 = getenv("LMOE_PEAK_FLOPS_FP8");
  PEAK_FLOPS_FP8 = pf8 && atof(pf8) > 0 ? atof(pf8) : 2 * PEAK_FLOPS;
  const char *sel[4];
  FILE *csv = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--m") && i + 1 < argc) {
      nM = parse_ints(argv[++i], Ms, 16);
    } else if (!strcmp(argv[i], "--iters") && i + 1 < argc) {
      iters = atoi(argv[++i]);
    } else if (!strcmp(argv[i], "--case") && i + 1 < argc) {
      only_case = atoi(argv[++i]);
    } else if (!strcmp(argv[i], "--profile")) {
      profile_only = 1; /* one eager timing pass per case, for a profiler */
    } else if (!strcmp(argv[i], "--gemms")) {
      gemms = 1;
    } else if (!strcmp(argv[i], "--dense") && i + 1 < argc) {
      dense = atoi(argv[++i]);
    } else if (!strcmp(argv[i], "--fp8")) {
      if (!fp8) fp8 = 1;
    } else if (!strcmp(argv[i], "--fp8-only")) {
      fp8 = 2;
    } else if (!strcmp(argv[i], "--stack")) {
      stack = 1;
    } else if (!strcmp(argv[i], "--csv") && i + 1 < argc) {
      csv = fopen(argv[++i], "w");
    } else if (nsel < 4) {
      sel[nsel++] = argv[i];
    }
  }
  lmoe_device_info di;
  if (lmoe_device_get_info(0, &di)) {
    fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  printf("card: %s (sm_%d%d, %d SMs)\n", di.name, di.cc_major, di.cc_minor, di.sm_count);
  printf("floor from: %.0f TFLOP/s, %.2f TB/s (FP8 base GEMMs: %.0f TFLOP/s)\n", PEAK_FLOPS / 1e12,
         PEAK_BYTES / 1e12, PEAK_FLOPS_FP8 / 1e12);
  if (dense > 0) return run_dense_all(dense, iters);
  int maxM = 0;
  for (int i = 0; i < nM; i++) maxM = Ms[i] > maxM ? Ms[i] : maxM;
  for (size_t pi = 0; pi < sizeof PRESETS / sizeof PRESETS[0]; pi++) {
    int want = nsel == 0;
    for (int s = 0; s < nsel; s++) want |= strstr(PRESETS[pi].name, sel[s]) != NULL;
    if (!want) continue;
    if (gemms) {
      if (fp8 == 2) run_gemms_fp8_preset(&PRESETS[pi], Ms, nM, iters, csv);
      else run_gemms_preset(&PRESETS[pi], Ms, nM, iters, csv);
      continue;
    }
    bench b;
    if (fp8 != 2) {
      setup(&b, &PRESETS[pi], maxM, 0);
      b.csv = csv;
      run_preset(&b, Ms, nM, iters);
      if (pi == 0 && !profile_only) {
        run_early_exit(&b, Ms, nM, iters);
        if (stack) run_stack(&b, 2048 <= maxM ? 2048 : maxM);
      }
      teardown(&b);
    }
    if (fp8) {
      setup(&b, &PRESETS[pi], maxM, 1);
      b.csv = csv;
      run_preset(&b, Ms, nM, iters);
      teardown(&b);
    }
  }
  if (csv) fclose(csv);
  return 0;
}
