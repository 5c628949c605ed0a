/* GPU forward: CUDA against a float64 host computation (and lmoe_reference_forward /
   the cpu backend where those run) on random shapes and batch mixes; device memory
   steady over 1,000 forwards; errors as statuses with messages. */
#include "gpu_common.h"

static const double TOL = 1e-2; /* bf16 operands, fp32 accumulation */

/* One random case; returns its rel L2 error. */
static void run_case(lmoe_context *ctx, int idx, int E, int H, int I, int k, int M, int S, int R,
                     int given, int special) {
  gpu_case c;
  case_init(&c, ctx, E, H, I, k, M, S, R, given, (int)(test_rand() % 3 == 0));
  if (given) case_set_routing(&c, special == 1);
  /* adapters: mixed ranks, fused or separate, subsets of parts */
  for (int s = 0; s < S; s++) {
    int fused = (int)(test_rand() % 3 == 0);
    int targets = fused ? (int)(3 | (test_rand() & 4)) : (int)(1 + test_rand() % 7);
    int rg = 1 + (int)(test_rand() % (uint64_t)R), ru = 1 + (int)(test_rand() % (uint64_t)R);
    int rd = 1 + (int)(test_rand() % (uint64_t)R);
    if (s == 0) targets = 7, rg = R, rd = R; /* one adapter with everything at max rank */
    /* every adapter in every tile: one of them without gate / up, one without down, so
       that a tile's groups include some with no columns on one side */
    if (special == 3 && s == 1) targets = LMOE_TARGET_DOWN, fused = 0;
    if (special == 3 && s == 2) targets = LMOE_TARGET_GATE | LMOE_TARGET_UP;
    case_load_adapter(&c, s, targets, fused, rg, ru, rd);
  }
  int nreq = 1 + (int)(test_rand() % 6);
  int slots[8];
  for (int i = 0; i < nreq; i++) slots[i] = S ? (int)(test_rand() % (uint64_t)(S + 1)) - 1 : -1;
  if (S && special == 2) slots[0] = 0, nreq = 1; /* one adapter for the whole batch */
  if (S && special == 3) /* every adapter active, twice over: all of them in each tile */
    for (int i = 0; i < 8; i++) slots[i] = i % S, nreq = 8;
  case_set_batch(&c, nreq, slots);

  lmoe_forward_args a;
  case_args(&c, &a);
  OK(ctx, lmoe_buffer_fill(c.out, NAN, NULL)); /* poison: every element must be written */
  OK(ctx, lmoe_forward(ctx, &a, NULL));
  double *ref = malloc(sizeof(double) * (size_t)M * H), *base = malloc(sizeof(double) * (size_t)M * H);
  case_reference(&c, ref, 1);
  int64_t bad = 0;
  double err = case_compare(&c, ref, &bad);
  lmoe_batch_info bi;
  lmoe_batch_get_info(c.batch, &bi);
  printf("case %2d: E=%d H=%d I=%d k=%d M=%d slots=%d R=%d %s active=%d  rel_l2=%.2e\n", idx, E, H, I,
         k, M, S, R, given ? "given-routing" : "logits", bi.num_active, err);
  CHECK(bad == 0 && err < TOL, "case %d: rel L2 %.3e, %lld non-finite", idx, err, (long long)bad);
  if (bi.num_active > 0) {
    case_reference(&c, base, 0);
    /* the adapters' effect on the rows of adapted tokens stands well clear of the
       error (over the whole output it shrinks with the share of adapted tokens) */
    double num = 0, den = 0;
    for (int q = 0, t0 = 0; q < c.nreq; t0 += c.req_tok[q++])
      for (size_t i = (size_t)t0 * H; c.req_slot[q] >= 0 && i < (size_t)(t0 + c.req_tok[q]) * H; i++)
        num += (base[i] - ref[i]) * (base[i] - ref[i]), den += ref[i] * ref[i];
    double d = den > 0 ? sqrt(num / den) : 0;
    CHECK(d > 2 * TOL, "case %d: adapters change their tokens' output by only %.2e", idx, d);
  }
  /* the library's float64 reference (it rounds h to bf16 as the backends store it,
     so it sits a bf16 rounding away from the test's pure float64) */
  int64_t sref[2] = {M, H};
  lmoe_buffer *rb = NULL;
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_F64, LMOE_MEMORY_HOST, 2, sref, &rb));
  a.out = rb;
  OK(ctx, lmoe_reference_forward(ctx, &a));
  double *lr = malloc(sizeof(double) * (size_t)M * H);
  OK(ctx, lmoe_buffer_read(rb, 0, lr, LMOE_DTYPE_F64, (int64_t)M * H));
  double dref = rel_diff(lr, ref, (size_t)M * H);
  CHECK(dref < 5e-3, "case %d: lmoe_reference_forward differs from the test's float64 by %.2e", idx, dref);
  float *gpu = malloc(sizeof(float) * (size_t)M * H + 4);
  OK(ctx, lmoe_buffer_read(c.out, 0, gpu, LMOE_DTYPE_F32, (int64_t)M * H));
  double *gd = malloc(sizeof(double) * (size_t)M * H + 8);
  for (size_t i = 0; i < (size_t)M * H; i++) gd[i] = gpu[i];
  double dlib = rel_diff(gd, lr, (size_t)M * H);
  /* each adapter's effect alone, on its requests' rows: a group whose expand went
     wrong (the sm90 engine packs the groups' ranks side by side in shared K chunks)
     shows here at ~1 (one wrong 8-column piece of a 64-wide chunk at ~0.35), where the whole
     output's error can hide it. Judged where the
     effect is at least 2% of those rows (below that bf16's rounding is a fair share). */
  for (int s = 0; s < S; s++) {
    double en = 0, dn = 0, on = 0;
    for (int q = 0, t0 = 0; q < c.nreq; t0 += c.req_tok[q++])
      for (size_t i = (size_t)t0 * H; c.req_slot[q] == s && i < (size_t)(t0 + c.req_tok[q]) * H; i++)
        en += (gd[i] - ref[i]) * (gd[i] - ref[i]), dn += (ref[i] - base[i]) * (ref[i] - base[i]),
            on += ref[i] * ref[i];
    if (dn <= 4e-4 * on || on == 0) continue;
    double de = sqrt(en / dn);
    printf("         adapter %d: effect %.2e of its rows, its error %.2e of the effect\n", s, sqrt(dn / on), de);
    CHECK(de < 0.3, "case %d: adapter %d's effect off by %.3e of itself", idx, s, de);
  }
  /* the cpu backend on the same weights, inputs, adapters and batch */
  double *cd = malloc(sizeof(double) * (size_t)M * H + 8);
  cpu_mirror_forward(&c, cd);
  double dcpu = rel_diff(gd, cd, (size_t)M * H);
  double dcpu_ref = rel_diff(cd, lr, (size_t)M * H);
  printf("         vs lmoe_reference %.2e, vs cpu backend %.2e (cpu vs reference %.2e)\n", dlib, dcpu,
         dcpu_ref);
  CHECK(dlib < TOL, "case %d: cuda vs lmoe_reference_forward %.3e", idx, dlib);
  CHECK(dcpu < TOL, "case %d: cuda vs cpu backend %.3e", idx, dcpu);
  free(lr), free(gpu), free(gd), free(cd);
  lmoe_buffer_release(rb);
  free(ref);
  free(base);
  case_free(&c);
}

static void test_random_cases(void) {
  lmoe_context *ctx = gpu_context(LMOE_GUARD_HOST, NULL);
  int idx = 0;
  /* fixed corners first: M=1, all tokens on one expert, experts without tokens,
     odd sizes (the unaligned load path), a batch on one adapter */
  run_case(ctx, idx++, 8, 256, 128, 2, 1, 3, 16, 0, 0);
  run_case(ctx, idx++, 16, 128, 64, 1, 300, 2, 8, 1, 1);
  run_case(ctx, idx++, 16, 256, 192, 4, 3, 4, 32, 0, 0);
  run_case(ctx, idx++, 4, 100, 60, 2, 77, 3, 5, 0, 0);
  run_case(ctx, idx++, 8, 192, 96, 2, 129, 2, 16, 1, 2);
  run_case(ctx, idx++, 1, 64, 40, 1, 50, 2, 7, 0, 0);
  run_case(ctx, idx++, 8, 512, 256, 8, 260, 0, 0, 0, 0);
  run_case(ctx, idx++, 4, 256, 128, 2, 700, 3, 16, 0, 0); /* many pairs per expert: 128-row tiles */
  /* four adapters up to rank 80 in 128-row tiles: the packed expand's segments cross
     and fill whole 64-wide chunks */
  run_case(ctx, idx++, 4, 256, 128, 2, 700, 4, 80, 0, 0);
  run_case(ctx, idx++, 4, 256, 128, 2, 200, 4, 80, 0, 3);
  /* a long K on one side only: by default (gemm_config.h) one shrink on the sm90 rows
     and the other on sm80's, each way round */
  run_case(ctx, idx++, 8, 2048, 256, 2, 300, 3, 16, 0, 3);
  run_case(ctx, idx++, 8, 256, 2048, 2, 300, 3, 16, 0, 3);
  /* many experts from logits: several a lane in the routing's warp (up to 128 and up to
     256 on k_route_reg's two paths), k up to 8 */
  run_case(ctx, idx++, 100, 64, 32, 6, 150, 2, 8, 0, 0);
  run_case(ctx, idx++, 160, 64, 32, 8, 150, 2, 8, 0, 0);
  /* a pool of one slot (the expand's 3-D map of the pool B with one plane), a narrow I
     and an H whose last 256-column tile holds 8 columns */
  run_case(ctx, idx++, 10, 264, 24, 5, 192, 1, 32, 1, 0);
  /* LMOE_TEST_QUICK: the fixed corners only (for runs under compute-sanitizer) */
  int nrand = getenv("LMOE_TEST_QUICK") ? 0 : 12;
  for (int i = 0; i < nrand; i++) {
    int E = 1 + (int)(test_rand() % 24);
    int k = 1 + (int)(test_rand() % (uint64_t)(E < 6 ? E : 6));
    int H = 8 * (4 + (int)(test_rand() % 40)), I = 8 * (2 + (int)(test_rand() % 40));
    if (i % 4 == 3) H += 2, I += 6; /* not multiples of 8 */
    int M = 1 + (int)(test_rand() % 400);
    int S = i % 5 == 4 ? 0 : 1 + (int)(test_rand() % 4), R = 1 + (int)(test_rand() % 32);
    run_case(ctx, idx++, E, H, I, k, M, S, R, (int)(test_rand() & 1), 0);
  }
  lmoe_context_release(ctx);
}

/* The same inputs twice give the same bits (the reduction has a fixed order). */
static void test_deterministic(void) {
  lmoe_context *ctx = gpu_context(LMOE_GUARD_HOST, NULL);
  gpu_case c;
  case_init(&c, ctx, 16, 256, 128, 4, 700, 3, 16, 0, 0);
  for (int s = 0; s < 3; s++) case_load_adapter(&c, s, 7, s == 1, 16, 8, 4 + 4 * s);
  int slots[4] = {0, -1, 1, 2};
  case_set_batch(&c, 4, slots);
  lmoe_forward_args a;
  case_args(&c, &a);
  size_t n = (size_t)c.M * c.H;
  uint16_t *o1 = malloc(n * 2), *o2 = malloc(n * 2);
  OK(ctx, lmoe_forward(ctx, &a, NULL));
  OK(ctx, lmoe_buffer_read(c.out, 0, o1, LMOE_DTYPE_BF16, (int64_t)n));
  for (int i = 0; i < 3; i++) OK(ctx, lmoe_forward(ctx, &a, NULL));
  OK(ctx, lmoe_buffer_read(c.out, 0, o2, LMOE_DTYPE_BF16, (int64_t)n));
  CHECK(memcmp(o1, o2, n * 2) == 0, "two forwards of the same inputs differ");
  free(o1), free(o2);
  case_free(&c);
  lmoe_context_release(ctx);
}

/* More requests than fit in kernel parameters: the metadata travels through the
   batch's pinned staging; a batch change right after a forward must not race it. */
static void test_many_requests(void) {
  lmoe_context *ctx = gpu_context(LMOE_GUARD_HOST, NULL);
  gpu_case c;
  int M = 900, n = 700;
  case_init(&c, ctx, 8, 128, 64, 2, M, 3, 8, 0, 0);
  for (int s = 0; s < 3; s++) case_load_adapter(&c, s, 7, s == 2, 8, 4, 8);
  int *slots = malloc(sizeof(int) * (size_t)n);
  double *ref = malloc(sizeof(double) * (size_t)M * c.H);
  lmoe_forward_args a;
  case_args(&c, &a);
  for (int round = 0; round < 3; round++) {
    for (int i = 0; i < n; i++) slots[i] = (int)(test_rand() % 4) - 1;
    case_set_batch(&c, n, slots);
    lmoe_counters c0, c1;
    lmoe_context_counters(ctx, &c0);
    OK(ctx, lmoe_forward(ctx, &a, NULL));
    lmoe_context_counters(ctx, &c1);
    CHECK(c1.host_waits == c0.host_waits, "a forward of a large batch waited for the device");
    if (round < 2) continue; /* the next set lands while this forward may still run */
    case_reference(&c, ref, 1);
    int64_t bad;
    double err = case_compare(&c, ref, &bad);
    printf("many requests (%d): rel_l2 %.2e\n", n, err);
    CHECK(bad == 0 && err < TOL, "many requests: rel L2 %.3e", err);
  }
  free(slots);
  free(ref);
  case_free(&c);
  lmoe_context_release(ctx);
}

/* Allocator hooks that count the library's device allocations and frees. */
typedef struct hook_count {
  int allocs, frees;
  size_t live;
} hook_count;

static void *hook_alloc(void *user, size_t bytes) {
  hook_count *h = user;
  void *p = NULL;
  if (cudaMalloc(&p, bytes) != cudaSuccess) return NULL;
  h->allocs++;
  h->live += bytes;
  return p;
}

static void hook_free(void *user, void *p) {
  hook_count *h = user;
  h->frees++;
  cudaFree(p);
}

/* A cuda context whose device memory goes through the counting hooks (NULL, the test
   failed, if it cannot be made). */
static lmoe_context *hooked_context(hook_count *hc) {
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.backend = LMOE_BACKEND_CUDA;
  cfg.guard = LMOE_GUARD_HOST;
  cfg.allocator.alloc = hook_alloc;
  cfg.allocator.free = hook_free;
  cfg.allocator.user = hc;
  lmoe_context *ctx = NULL;
  char err[256];
  OK(NULL, lmoe_context_create(&cfg, &ctx, err, sizeof err));
  return ctx;
}

/* Steady state: 1,000 forwards over changing batches allocate no device memory
   (nothing per forward or per batch_set of a known size). Counted through the
   allocator hooks, which every device allocation of the library goes through (the
   hook test below checks that), so other processes on the card cannot disturb it;
   the device's free memory is compared too where the card is this test's alone
   (LMOE_TEST_EXCLUSIVE_DEVICE=1: ctest's serial variant). */
static void test_memory_steady(void) {
  hook_count hc = {0, 0, 0};
  lmoe_context *ctx = hooked_context(&hc);
  if (!ctx) return;
  gpu_case c;
  case_init(&c, ctx, 16, 256, 128, 2, 256, 4, 16, 0, 0);
  for (int s = 0; s < 4; s++) case_load_adapter(&c, s, 7, 0, 16, 16, 16);
  int slots[8] = {0, 1, 2, 3, -1, 0, 1, 2};
  case_set_batch(&c, 8, slots);
  lmoe_forward_args a;
  case_args(&c, &a);
  OK(ctx, lmoe_forward(ctx, &a, NULL));
  OK(ctx, lmoe_context_synchronize(ctx, NULL));
  size_t free0 = 0, total = 0, free1 = 0;
  cudaMemGetInfo(&free0, &total);
  const int allocs0 = hc.allocs, frees0 = hc.frees;
  for (int i = 0; i < 1000; i++) {
    int sl[8];
    for (int q = 0; q < 8; q++) sl[q] = (int)(test_rand() % 5) - 1;
    case_set_batch(&c, 8, sl);
    OK(ctx, lmoe_forward(ctx, &a, NULL));
  }
  OK(ctx, lmoe_context_synchronize(ctx, NULL));
  cudaMemGetInfo(&free1, &total);
  CHECK(allocs0 > 0 && hc.allocs == allocs0 && hc.frees == frees0,
        "1000 forwards: %d device allocations and %d frees through the hooks (0 expected)", hc.allocs - allocs0,
        hc.frees - frees0);
  const char *ex = getenv("LMOE_TEST_EXCLUSIVE_DEVICE");
  if (ex && atoi(ex))
    CHECK(free0 == free1, "device memory free went from %zu to %zu over 1000 forwards", free0, free1);
  else
    printf("steady memory: %zu -> %zu bytes free on the device (compared only with LMOE_TEST_EXCLUSIVE_DEVICE=1)\n",
           free0, free1);
  case_free(&c);
  lmoe_context_release(ctx);
}

static void test_errors(void) {
  lmoe_context *ctx = gpu_context(LMOE_GUARD_HOST, NULL);
  gpu_case c;
  case_init(&c, ctx, 8, 128, 64, 2, 64, 2, 8, 0, 0);
  case_load_adapter(&c, 0, 7, 0, 8, 8, 8);
  int32_t tok2[2] = {40, 24}, slots[2] = {0, -1}; /* slot 0 active: request 0 has tokens */
  OK(ctx, lmoe_batch_set(c.batch, c.pool, 2, tok2, slots));
  lmoe_forward_args a;
  case_args(&c, &a);
  /* wrong shape of x */
  lmoe_buffer *bad = NULL;
  int64_t sh[2] = {64, 100};
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sh, &bad));
  a.x = bad;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL));
  lmoe_buffer_release(bad);
  /* x in host memory: the cuda forward reads device memory only */
  int64_t shx[2] = {64, 128};
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_HOST, 2, shx, &bad));
  a.x = bad;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL));
  CHECK(strstr(lmoe_context_last_error(ctx), "must be in device memory"), "%s", lmoe_context_last_error(ctx));
  lmoe_buffer_release(bad);
  case_args(&c, &a);
  /* slot out of range in a batch */
  int tok[1] = {64}, sl[1] = {5};
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_batch_set(c.batch, c.pool, 1, tok, sl));
  /* a slot unloaded after the batch was built */
  OK(ctx, lmoe_pool_unload(c.pool, 0));
  FAILS(ctx, LMOE_ERR_STATE, lmoe_forward(ctx, &a, NULL));
  /* out of device memory: a layer whose workspace cannot exist */
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = 8, lc.hidden = 4096, lc.intermediate = 4096, lc.top_k = 8;
  lc.max_tokens = 1 << 24;
  lmoe_layer *huge = NULL;
  FAILS(ctx, LMOE_ERR_OUT_OF_MEMORY, lmoe_layer_create(ctx, &lc, &huge));
  CHECK(huge == NULL, "failed layer_create left a layer");
  /* the context still works afterwards */
  OK(ctx, lmoe_pool_load_random(c.pool, 0, &(lmoe_random_adapter){.struct_size = sizeof(lmoe_random_adapter),
                                                                   .targets = 7, .rank = 4, .alpha = 8,
                                                                   .seed = 3, .scale = 0.05f}));
  OK(ctx, lmoe_forward(ctx, &a, NULL));
  OK(ctx, lmoe_context_synchronize(ctx, NULL));
  /* a context on a device that does not exist */
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.backend = LMOE_BACKEND_CUDA;
  cfg.device = 999;
  lmoe_context *none = NULL;
  char err[256] = "";
  lmoe_status st = lmoe_context_create(&cfg, &none, err, sizeof err);
  CHECK(st == LMOE_ERR_NOT_FOUND && none == NULL && err[0], "device 999 gave %s: %s",
        lmoe_status_string(st), err);
  /* device facts */
  lmoe_device_info di;
  memset(&di, 0, sizeof di);
  di.struct_size = sizeof di;
  OK(ctx, lmoe_device_get_info(0, &di));
  CHECK(di.name[0] && di.cc_major >= 8 && di.sm_count > 0 && di.memory_bytes > 0,
        "device 0: '%s' sm_%d%d, %d SMs, %lld bytes", di.name, (int)di.cc_major, (int)di.cc_minor,
        (int)di.sm_count, (long long)di.memory_bytes);
  CHECK(lmoe_device_get_info(-1, &di) != LMOE_OK && lmoe_device_get_info(999, &di) != LMOE_OK,
        "devices -1 and 999 are refused");
  case_free(&c);
  lmoe_context_release(ctx);
}

/* Device memory through the caller's allocator hooks: every allocation goes through
   them, each is freed once by the end, and the forward is right. */
static void test_allocator_hooks(void) {
  hook_count hc = {0, 0, 0};
  lmoe_context *ctx = hooked_context(&hc);
  if (!ctx) return;
  gpu_case c;
  case_init(&c, ctx, 8, 128, 64, 2, 96, 2, 8, 0, 0);
  case_load_adapter(&c, 0, 7, 0, 8, 8, 8);
  int slots[3] = {0, -1, 1};
  case_load_adapter(&c, 1, 5, 0, 4, 4, 4);
  case_set_batch(&c, 3, slots);
  lmoe_forward_args a;
  case_args(&c, &a);
  OK(ctx, lmoe_forward(ctx, &a, NULL));
  double *ref = malloc(sizeof(double) * (size_t)c.M * c.H);
  case_reference(&c, ref, 1);
  int64_t bad;
  double e = case_compare(&c, ref, &bad);
  CHECK(bad == 0 && e < TOL, "forward with allocator hooks: rel L2 %.3e", e);
  int during = hc.allocs;
  case_free(&c);
  lmoe_context_release(ctx);
  printf("allocator hooks: %d allocations (%zu bytes), %d frees\n", hc.allocs, hc.live, hc.frees);
  CHECK(during > 0 && hc.allocs == hc.frees, "allocator hooks: %d allocations, %d frees", hc.allocs, hc.frees);
  free(ref);
}

/* fill and fill_random of a host buffer on the cuda backend: the same values as on the
   cpu backend (one generator), after the stream's earlier work */
static void test_host_fill(void) {
  lmoe_context *cu = gpu_context(LMOE_GUARD_HOST, NULL), *cpu = NULL;
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.backend = LMOE_BACKEND_CPU;
  char err[256];
  OK(NULL, lmoe_context_create(&cfg, &cpu, err, sizeof err));
  if (!cpu) return;
  int64_t sh[1] = {1000};
  lmoe_buffer *a = NULL, *b = NULL;
  OK(cu, lmoe_buffer_create(cu, LMOE_DTYPE_F32, LMOE_MEMORY_HOST, 1, sh, &a));
  OK(cpu, lmoe_buffer_create(cpu, LMOE_DTYPE_F32, LMOE_MEMORY_HOST, 1, sh, &b));
  uint64_t seed = test_rand();
  OK(cu, lmoe_buffer_fill_random(a, seed, -3.0f, 5.0f, NULL));
  OK(cpu, lmoe_buffer_fill_random(b, seed, -3.0f, 5.0f, NULL));
  lmoe_buffer_desc da, db;
  OK(cu, lmoe_buffer_describe(a, &da));
  OK(cpu, lmoe_buffer_describe(b, &db));
  CHECK(memcmp(da.data, db.data, da.bytes) == 0, "host fill_random on cuda differs from cpu");
  OK(cu, lmoe_buffer_fill(a, 0.25, NULL));
  int ok = 1;
  for (int i = 0; i < 1000; i++) ok &= ((float *)da.data)[i] == 0.25f;
  CHECK(ok, "host fill on cuda");
  lmoe_buffer_release(a);
  lmoe_buffer_release(b);
  lmoe_context_release(cu);
  lmoe_context_release(cpu);
}

int main(void) {
  if (!test_need_gpu("test_gpu_forward")) return 1;
  test_random_cases();
  test_deterministic();
  test_many_requests();
  if (!getenv("LMOE_TEST_QUICK")) test_memory_steady();
  test_errors();
  test_allocator_hooks();
  test_host_fill();
  return test_summary();
}
