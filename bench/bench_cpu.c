/* CPU backend throughput against this machine's fp32 FMA peak.

   peak: every thread runs a register-blocked loop of independent vector FMAs (the
         widest of AVX-512 / AVX2+FMA / SSE the CPU has); GFLOP/s = 2 * lanes * FMAs / s.
   forward: lmoe_forward on the cpu backend, median of repetitions after a warm-up.
         FLOPs = pairs * (2*H*2I + 2*I*H)           base: gate/up GEMM + down GEMM
               + lora_pairs * 6*r*(H + I)           LoRA on gate, up, down (shrink + expand)
         where pairs = M*k and lora_pairs are the pairs of tokens that have an adapter
         (SiLU, routing and the reduction are not counted).

   usage: bench_cpu [threads, e.g. 1,2,4] [preset: 0 tiny, 1 mid] */
#include "bench_common.h"
#include "loramoe.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#endif

/* ------------------------------------------------------------------ peak */

#define PEAK_ITERS 50000000L
#define NACC 12

/* 12 independent accumulators in registers: enough FMAs in flight to cover the
   latency of two FMA pipes. The chains can't be folded without fast-math. */
#define PEAK_BODY(VT)                                                                     \
  VT m = (VT){0} + 0.999999f, c = (VT){0} + 1e-7f;                                        \
  VT a0 = (VT){0} + 0.1f, a1 = a0 + 0.01f, a2 = a0 + 0.02f, a3 = a0 + 0.03f;              \
  VT a4 = a0 + 0.04f, a5 = a0 + 0.05f, a6 = a0 + 0.06f, a7 = a0 + 0.07f;                  \
  VT a8 = a0 + 0.08f, a9 = a0 + 0.09f, a10 = a0 + 0.1f, a11 = a0 + 0.11f;                 \
  for (long it = 0; it < iters; it++) {                                                   \
    a0 = a0 * m + c, a1 = a1 * m + c, a2 = a2 * m + c, a3 = a3 * m + c;                   \
    a4 = a4 * m + c, a5 = a5 * m + c, a6 = a6 * m + c, a7 = a7 * m + c;                   \
    a8 = a8 * m + c, a9 = a9 * m + c, a10 = a10 * m + c, a11 = a11 * m + c;               \
  }                                                                                       \
  VT t = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;                     \
  float s = 0;                                                                            \
  for (int l = 0; l < (int)(sizeof(VT) / 4); l++) s += t[l];                              \
  return s;

typedef float v4f __attribute__((vector_size(16)));
#if defined(__x86_64__) && defined(__GNUC__)
typedef float v8f __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));
__attribute__((target("avx512f"))) static float peak_avx512(long iters) { PEAK_BODY(v16f) }
__attribute__((target("avx2,fma"))) static float peak_avx2(long iters) { PEAK_BODY(v8f) }
#endif
static float peak_sse(long iters) { PEAK_BODY(v4f) }

static int lanes(void) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 16;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 8;
#endif
  return 4;
}

static float peak_run(long iters) {
#if defined(__x86_64__) && defined(__GNUC__)
  int l = lanes();
  if (l == 16) return peak_avx512(iters);
  if (l == 8) return peak_avx2(iters);
#endif
  return peak_sse(iters);
}

static volatile float sink;
static void *peak_thread(void *v) {
  sink += peak_run(*(long *)v);
  return NULL;
}

/* Best of 3 runs (the first also wakes the cores up to speed). */
static double peak_gflops(int threads) {
  long iters = PEAK_ITERS;
  pthread_t t[256];
  double best = 0;
  for (int rep = 0; rep < 3; rep++) {
    double t0 = now_s();
    for (int i = 1; i < threads; i++) pthread_create(&t[i], NULL, peak_thread, &iters);
    peak_thread(&iters);
    for (int i = 1; i < threads; i++) pthread_join(t[i], NULL);
    double dt = now_s() - t0;
    /* an FMA is 2 FLOPs per lane */
    double g = 2.0 * lanes() * NACC * (double)iters * threads / dt / 1e9;
    if (g > best) best = g;
  }
  return best;
}

/* ------------------------------------------------------------------ forward */

typedef struct preset {
  const char *name;
  int E, H, I, k, M, adapters, rank;
} preset;

#define TRY(call)                                                                            \
  do {                                                                                       \
    lmoe_status st_ = (call);                                                                \
    if (st_) {                                                                               \
      fprintf(stderr, "%s: %s: %s\n", #call, lmoe_status_string(st_), lmoe_context_last_error(ctx)); \
      exit(1);                                                                               \
    }                                                                                        \
  } while (0)

/* Returns median seconds per forward; *flops gets the FLOPs counted as above. */
static double time_forward(const preset *p, int threads, int with_lora, int reps, double *flops) {
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.backend = LMOE_BACKEND_CPU;
  cfg.threads = threads;
  lmoe_context *ctx = NULL;
  TRY(lmoe_context_create(&cfg, &ctx, NULL, 0));
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = p->E, lc.hidden = p->H, lc.intermediate = p->I, lc.top_k = p->k;
  lc.max_tokens = p->M;
  lmoe_layer *layer;
  TRY(lmoe_layer_create(ctx, &lc, &layer));
  TRY(lmoe_layer_randomize(layer, 1, 0.05f));
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = p->adapters, pc.max_rank = p->rank;
  lmoe_pool *pool;
  TRY(lmoe_pool_create(layer, &pc, &pool));
  for (int s = 0; s < p->adapters; s++) {
    lmoe_random_adapter ra;
    lmoe_random_adapter_init(&ra);
    ra.rank = p->rank, ra.seed = (uint64_t)s + 1;
    TRY(lmoe_pool_load_random(pool, s, &ra));
  }
  /* 8 requests split M evenly, request i on adapter i % adapters (PERFORMANCE.md) */
  int32_t tok[8], sl[8];
  for (int i = 0; i < 8; i++) {
    tok[i] = p->M / 8 + (i < p->M % 8);
    sl[i] = with_lora ? i % p->adapters : LMOE_NO_ADAPTER;
  }
  lmoe_batch *batch;
  TRY(lmoe_batch_create(ctx, &batch));
  TRY(lmoe_batch_set(batch, pool, 8, tok, sl));
  int64_t sx[2] = {p->M, p->H}, sl2[2] = {p->M, p->E};
  lmoe_buffer *x, *lg, *out;
  TRY(lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &x));
  TRY(lmoe_buffer_create(ctx, LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE, 2, sl2, &lg));
  TRY(lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &out));
  TRY(lmoe_buffer_fill_random(x, 2, -1, 1, NULL));
  TRY(lmoe_buffer_fill_random(lg, 3, -1, 1, NULL));
  lmoe_forward_args a;
  lmoe_forward_args_init(&a);
  a.layer = layer, a.pool = pool, a.batch = batch, a.x = x, a.router_logits = lg, a.out = out;
  TRY(lmoe_forward(ctx, &a, NULL)); /* warm-up: worker pool, caches */
  double t[64];
  for (int r = 0; r < reps; r++) {
    double t0 = now_s();
    TRY(lmoe_forward(ctx, &a, NULL));
    t[r] = now_s() - t0;
  }
  double pairs = (double)p->M * p->k;
  *flops = pairs * (2.0 * p->H * 2 * p->I + 2.0 * p->I * p->H) +
           (with_lora ? pairs * 6.0 * p->rank * (p->H + p->I) : 0.0);
  lmoe_buffer_release(x), lmoe_buffer_release(lg), lmoe_buffer_release(out);
  lmoe_batch_release(batch);
  lmoe_pool_release(pool);
  lmoe_layer_release(layer);
  lmoe_context_release(ctx);
  return median(t, reps);
}

/* Thread counts: argv[1] as "1,2,4", else 1, 2, 4, ... and the core count. */
static int thread_list(int argc, char **argv, int *out) {
  int n = 0;
  if (argc > 1) {
    for (char *p = argv[1]; *p && n < 32;) {
      int t = (int)strtol(p, &p, 10);
      if (t >= 1 && t <= 256) out[n++] = t;
      if (*p) p++;
    }
    if (n) return n;
  }
  long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
  int maxt = ncpu > 0 ? (int)(ncpu > 256 ? 256 : ncpu) : 1;
  for (int t = 1; t < maxt; t *= 2) out[n++] = t;
  out[n++] = maxt;
  return n;
}

int main(int argc, char **argv) {
  int threads[32];
  int nt = thread_list(argc, argv, threads);
  int only = argc > 2 ? atoi(argv[2]) : -1; /* preset index, -1: all */
  printf("fp32 FMA peak (%d lanes per vector)\n\n| threads | GFLOP/s |\n|---|---|\n", lanes());
  double peak[32];
  for (int i = 0; i < nt; i++) {
    peak[i] = peak_gflops(threads[i]);
    printf("| %d | %.1f |\n", threads[i], peak[i]);
  }
  const preset presets[2] = {
      {"tiny", 16, 256, 128, 2, 512, 4, 16},
      {"mid", 32, 1024, 512, 4, 1024, 4, 16},
  };
  printf("\nlmoe_forward, cpu backend (median; 8 requests, 4 adapters rank 16 on gate/up/down)\n\n");
  printf("| preset | shape | LoRA | threads | ms | GFLOP/s | %% of peak |\n|---|---|---|---|---|---|---|\n");
  for (int pi = 0; pi < 2; pi++) {
    if (only >= 0 && pi != only) continue;
    const preset *p = &presets[pi];
    for (int lora = 1; lora >= 0; lora--) {
      for (int i = 0; i < nt; i++) {
        double flops;
        int reps = pi == 0 ? 31 : 7;
        double s = time_forward(p, threads[i], lora, reps, &flops);
        printf("| %s | E%d H%d I%d k%d M%d | %s | %d | %.2f | %.1f | %.0f%% |\n", p->name, p->E, p->H,
               p->I, p->k, p->M, lora ? "4 x r16" : "none", threads[i], 1e3 * s, flops / s / 1e9,
               100.0 * flops / s / 1e9 / peak[i]);
        fflush(stdout);
      }
    }
  }
  return 0;
}
