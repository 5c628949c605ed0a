/* Sharded layers on the cuda backend (docs/design.md, "Sharding"), every rank on one
   device:
   - one rank: through NCCL (an NCCL communicator of one rank from
     lmoe_comm_create_local, when the build has NCCL; else the case is skipped, saying
     so) and through a one-device group of one rank: f32 partial, the sum, one rounding;
   - 2 and 3 ranks as a group communicator of cuda contexts of one device (NCCL refuses
     one GPU twice): lmoe_forward_group enqueues every rank's forward and one kernel
     summing the partials into every rank's out.
   Tensor and expert parallel, adapters of mixed ranks and a request without one,
   router logits and given routing. Each summed output is held to the unsharded cuda
   layer's and to the float64 reference (lmoe_reference_forward), every rank's out the
   same bits; CUPTI counts no host synchronisation, device-to-host copy, blocking copy
   or allocation over forwards whose batch changes; a group forward captured in a CUDA
   graph in global capture mode replays to the eager forward's bits. Refusals: a lone
   rank of a one-device group, ranks on different streams.
   Where the machine has several devices and the build NCCL: 2 (and 4) ranks on as many
   devices through NCCL, the same checks, each rank's stream captured in its own graph
   (the simulated device runs these in CI with LMOE_SIM_DEVICES=4 and its NCCL). */
#include "gpu_common.h"

#include "cupti_count.h"

enum { E = 8, K = 2, NREQ = 5, SLOTS = 4, MAXR = 16 };
#ifdef LMOE_SIM_CUDA
enum { H = 512, I = 48 }; /* the simulated device is slow; H: two column chunks (LMOE_SHARD_CHUNKS) */
#else
enum { H = 768, I = 192 }; /* H: three column chunks of 256 (LMOE_SHARD_CHUNKS) */
#endif
static const int32_t req_tokens[NREQ] = {13, 1, 22, 0, 31};
static const int32_t req_slots[NREQ] = {0, LMOE_NO_ADAPTER, 1, 2, 3};
static int64_t M;

#include "../shard_case.h"

/* ---------------------------------------------------------------- ranks */

/* A rank's layer (randomize gives a shard its part of the whole layer's values), pool
   of adapters and inputs (shard_case.h). */
static void make_rank(rank_state *r, lmoe_layer_config lc, bool given_routing) {
  lmoe_context *c = r->ctx;
  OK(c, lmoe_layer_create(c, &lc, &r->layer));
  OK(c, lmoe_layer_randomize(r->layer, 7, 0.15f));
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = SLOTS, pc.max_rank = MAXR;
  OK(c, lmoe_pool_create(r->layer, &pc, &r->pool));
  load_adapters(c, r->pool);
  make_inputs(r, true, given_routing);
}

static void read_out(rank_state *r, float *dst) { OK(r->ctx, lmoe_buffer_read(r->out, 0, dst, LMOE_DTYPE_F32, M * H)); }

static double rel_l2(const float *a, const float *b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; i++) {
    double d = (double)a[i] - (double)b[i];
    num += d * d, den += (double)b[i] * b[i];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* The ranks' forwards: one NCCL or one-device rank alone through lmoe_forward (or the
   group call), several through lmoe_forward_group; streams: NULL (each context's own)
   or one a rank (ranks of one device: streams[0] and NULLs). */
static lmoe_status run_ranks(rank_state *rs, int32_t n, bool group, void *const *streams) {
  if (n == 1 && !group) return lmoe_forward(rs[0].ctx, &rs[0].args, streams ? streams[0] : NULL);
  lmoe_context *ctxs[4];
  const lmoe_forward_args *args[4];
  for (int32_t r = 0; r < n; r++) ctxs[r] = rs[r].ctx, args[r] = &rs[r].args;
  return lmoe_forward_group(n, ctxs, args, streams);
}

/* kind: "nccl" (one rank, lmoe_comm_create_local with NCCL), "group" (cuda contexts
   of one device) or "devices" (a device a rank, NCCL). */
static void run_case(int32_t mode, int32_t n, bool given_routing, const char *kind) {
  const bool devices = !strcmp(kind, "devices");
  char what[128];
  snprintf(what, sizeof what, "%s n=%d %s%s", mode == LMOE_SHARD_TP ? "TP" : "EP", (int)n, kind,
           given_routing ? " given routing" : " router");
  /* the unsharded cuda layer and the float64 reference */
  rank_state ref = {0};
  ref.ctx = gpu_context(LMOE_GUARD_HOST, NULL);
  make_rank(&ref, layer_cfg(LMOE_SHARD_TP, 0, 1, NULL), given_routing);
  OK(ref.ctx, lmoe_forward(ref.ctx, &ref.args, NULL));
  float *want = malloc((size_t)(M * H) * sizeof *want), *got = malloc((size_t)(M * H) * sizeof *got);
  float *first = malloc((size_t)(M * H) * sizeof *first);
  read_out(&ref, want);
  lmoe_buffer *f64 = NULL;
  int64_t s2[2] = {M, H};
  OK(ref.ctx, lmoe_buffer_create(ref.ctx, LMOE_DTYPE_F64, LMOE_MEMORY_HOST, 2, s2, &f64));
  lmoe_forward_args ra = ref.args;
  ra.out = f64;
  OK(ref.ctx, lmoe_reference_forward(ref.ctx, &ra));
  lmoe_compare_result cr;
  OK(ref.ctx, lmoe_buffer_compare(ref.out, f64, &cr));
  double ref_tol = cr.rel_l2;

  rank_state rs[4] = {{0}};
  lmoe_context *ctxs[4];
  lmoe_comm *comms[4];
  for (int32_t r = 0; r < n; r++) ctxs[r] = rs[r].ctx = gpu_context_on(LMOE_GUARD_HOST, NULL, devices ? r : 0);
  char err[256];
  OK(NULL, lmoe_comm_create_local(n, ctxs, comms, err, sizeof err));
  for (int32_t r = 0; r < n; r++) {
    make_rank(&rs[r], layer_cfg(mode, r, n, comms[r]), given_routing);
    lmoe_comm_release(comms[r]); /* the layer keeps it */
  }
  if (n > 1 && !devices) { /* a lone rank of a one-device group: nothing would sum it */
    lmoe_status st = lmoe_forward(rs[1].ctx, &rs[1].args, NULL);
    CHECK(st == LMOE_ERR_INVALID_ARGUMENT && strstr(lmoe_context_last_error(rs[1].ctx), "lmoe_forward_group"),
          "%s: a lone rank's forward: %s \"%s\"", what, lmoe_status_string(st), lmoe_context_last_error(rs[1].ctx));
  }
  for (int rep = 0; rep < 2; rep++) { /* n = 1: lmoe_forward, then the group call */
    for (int32_t r = 0; r < n; r++) OK(rs[r].ctx, lmoe_buffer_fill(rs[r].out, NAN, NULL));
    OK(rs[0].ctx, run_ranks(rs, n, rep == 1 || n > 1, NULL));
    for (int32_t r = 0; r < n; r++) {
      read_out(&rs[r], r ? got : first);
      if (r)
        CHECK(!memcmp(got, first, (size_t)(M * H) * sizeof *got), "%s: rank %d's output differs from rank 0's",
              what, (int)r);
    }
    int64_t same = 0, nonfinite = 0;
    for (int64_t i = 0; i < M * H; i++) same += first[i] == want[i], nonfinite += !isfinite(first[i]);
    double d_unsharded = rel_l2(first, want, M * H);
    lmoe_compare_result c2;
    OK(rs[0].ctx, lmoe_buffer_compare(rs[0].out, f64, &c2));
    printf("%s%s: rel_l2 vs unsharded cuda %.2e (%lld of %lld equal), vs float64 %.2e (unsharded %.2e)\n", what,
           n == 1 ? (rep ? " group call" : " lmoe_forward") : "", d_unsharded, (long long)same, (long long)(M * H),
           c2.rel_l2, ref_tol);
    /* EP and one rank: each pair's y is the unsharded layer's and only the float32
       sum's association can differ; TP: each rank's partial y is rounded to bf16 on
       its own (an error of the size of the unsharded layer's own) */
    double lim = mode == LMOE_SHARD_EP || n == 1 ? 2e-3 : 1e-2;
    CHECK(nonfinite == 0 && d_unsharded <= lim, "%s: rel L2 %.3e against the unsharded cuda layer (limit %.0e), "
          "%lld non-finite", what, d_unsharded, lim, (long long)nonfinite);
    CHECK(c2.rel_l2 <= 1e-2 && c2.rel_l2 <= 3 * ref_tol + 1e-3 && c2.nonfinite == 0,
          "%s: rel_l2 %.3g against the float64 reference (unsharded: %.3g)", what, c2.rel_l2, ref_tol);
    if (n > 1) break;
  }
  for (int32_t r = 0; r < n; r++) free_rank(&rs[r]);
  lmoe_buffer_release(f64);
  free_rank(&ref);
  free(want), free(got), free(first);
}

/* 0 host waits over forwards whose batch changes; then a forward captured in a graph in
   global capture mode replays to the eager forward's bits (every rank's context on the
   one captured stream). */
static void run_sync_and_graph(int32_t mode, int32_t n, const char *kind) {
  char what[96];
  snprintf(what, sizeof what, "%s n=%d %s", mode == LMOE_SHARD_TP ? "TP" : "EP", (int)n, kind);
  /* one stream (ranks of one device), or one a device, each captured in its own graph */
  const bool devices = !strcmp(kind, "devices");
  const int32_t ns = devices ? n : 1;
  cudaStream_t ss[4] = {NULL, NULL, NULL, NULL};
  void *streams[4] = {NULL, NULL, NULL, NULL};
  for (int32_t i = 0; i < ns; i++) {
    if (cudaSetDevice(i) != cudaSuccess ||
        cudaStreamCreateWithFlags(&ss[i], cudaStreamNonBlocking) != cudaSuccess) {
      CHECK(0, "cudaStreamCreate on device %d failed", (int)i);
      return;
    }
    streams[i] = ss[i];
  }
  cudaSetDevice(0);
  rank_state rs[4] = {{0}};
  lmoe_context *ctxs[4];
  lmoe_comm *comms[4];
  for (int32_t r = 0; r < n; r++)
    ctxs[r] = rs[r].ctx = gpu_context_on(LMOE_GUARD_ALWAYS, ss[devices ? r : 0], devices ? r : 0);
  char err[256];
  OK(NULL, lmoe_comm_create_local(n, ctxs, comms, err, sizeof err));
  for (int32_t r = 0; r < n; r++) {
    make_rank(&rs[r], layer_cfg(mode, r, n, comms[r]), false);
    lmoe_comm_release(comms[r]);
  }
  OK(rs[0].ctx, run_ranks(rs, n, n > 1, NULL)); /* warm: modules loaded, NCCL set up */
  for (int32_t r = 0; r < n; r++) OK(rs[r].ctx, lmoe_context_synchronize(rs[r].ctx, NULL));
  lmoe_counters c0[4], c1[4];
  for (int32_t r = 0; r < n; r++) lmoe_context_counters(rs[r].ctx, &c0[r]);
  int32_t tok[NREQ], slots[NREQ];
  n_sync = n_d2h = n_blocking = n_alloc = 0;
  counting = 1;
  enum { ROUNDS = 20 };
  for (int i = 0; i < ROUNDS; i++) {
    for (int q = 0; q < NREQ; q++) { /* another split and adapter mix, the same M */
      tok[q] = req_tokens[(q + i) % NREQ];
      slots[q] = (i + q) % 5 == 4 ? LMOE_NO_ADAPTER : (int32_t)((i * 3 + q) % SLOTS);
    }
    for (int32_t r = 0; r < n; r++) OK(rs[r].ctx, lmoe_batch_set(rs[r].batch, rs[r].pool, NREQ, tok, slots));
    OK(rs[0].ctx, run_ranks(rs, n, n > 1, NULL));
  }
  counting = 0;
  uint64_t waits = 0;
  for (int32_t r = 0; r < n; r++) {
    lmoe_context_counters(rs[r].ctx, &c1[r]);
    waits += c1[r].host_waits - c0[r].host_waits;
    CHECK(c1[r].forwards - c0[r].forwards == ROUNDS, "%s: rank %d counted %llu forwards", what, (int)r,
          (unsigned long long)(c1[r].forwards - c0[r].forwards));
  }
  printf("%s: %d forwards: CUPTI syncs %d, d2h copies %d, blocking copies %d, allocations %d; counted host waits "
         "%llu\n",
         what, ROUNDS, n_sync, n_d2h, n_blocking, n_alloc, (unsigned long long)waits);
  CHECK(n_sync == 0 && n_d2h == 0 && n_blocking == 0 && n_alloc == 0 && waits == 0,
        "%s: host synchronisations %d, d2h copies %d, blocking copies %d, allocations %d, host waits %llu "
        "(want all 0)",
        what, n_sync, n_d2h, n_blocking, n_alloc, (unsigned long long)waits);

  /* the last batch once more, eagerly, on the stream to capture: its metadata is on the
     device in that stream's order (a capture made with cudaStreamBeginCapture needs it) */
  float *eager = malloc((size_t)(M * H) * sizeof *eager), *replay = malloc((size_t)(M * H) * sizeof *replay);
  OK(rs[0].ctx, run_ranks(rs, n, n > 1, streams));
  read_out(&rs[0], eager);
  cudaGraph_t g[4] = {NULL, NULL, NULL, NULL};
  cudaGraphExec_t ge[4] = {NULL, NULL, NULL, NULL};
  for (int32_t i = 0; i < ns; i++)
    CHECK(cudaStreamBeginCapture(ss[i], cudaStreamCaptureModeGlobal) == cudaSuccess, "%s: begin capture %d", what,
          (int)i);
  lmoe_status st = run_ranks(rs, n, n > 1, streams);
  cudaError_t ce = cudaSuccess;
  for (int32_t i = 0; i < ns; i++) {
    cudaError_t ei = cudaStreamEndCapture(ss[i], &g[i]);
    if (!ce) ce = ei;
  }
  CHECK(st == LMOE_OK && ce == cudaSuccess, "%s: capture: %s / %s", what, lmoe_context_last_error(rs[0].ctx),
        cudaGetErrorString(ce));
  if (!st && !ce) {
    for (int32_t i = 0; i < ns && !ce; i++) ce = cudaGraphInstantiate(&ge[i], g[i], 0);
    CHECK(ce == cudaSuccess, "%s: instantiate: %s", what, cudaGetErrorString(ce));
    for (int32_t r = 0; r < n; r++) OK(rs[r].ctx, lmoe_buffer_fill(rs[r].out, NAN, NULL));
    for (int32_t r = 0; r < n; r++) OK(rs[r].ctx, lmoe_context_synchronize(rs[r].ctx, NULL));
    for (int32_t i = 0; i < ns && !ce; i++)
      CHECK(cudaGraphLaunch(ge[i], ss[i]) == cudaSuccess, "%s: graph launch %d", what, (int)i);
    for (int32_t i = 0; i < ns && !ce; i++)
      CHECK(cudaStreamSynchronize(ss[i]) == cudaSuccess, "%s: replay %d", what, (int)i);
    for (int32_t r = 0; r < n && !ce; r++) {
      read_out(&rs[r], replay);
      CHECK(!memcmp(replay, eager, (size_t)(M * H) * sizeof *eager),
            "%s: rank %d's output of the replay differs from the eager forward's", what, (int)r);
    }
    printf("%s: captured in global mode (%d graph%s), replayed: %s\n", what, (int)ns, ns > 1 ? "s" : "",
           memcmp(replay, eager, (size_t)(M * H) * sizeof *eager) ? "differs" : "the eager forward's bits");
    for (int32_t i = 0; i < ns; i++)
      if (ge[i]) cudaGraphExecDestroy(ge[i]);
  }
  for (int32_t i = 0; i < ns; i++)
    if (g[i]) cudaGraphDestroy(g[i]);
  free(eager), free(replay);
  for (int32_t r = 0; r < n; r++) free_rank(&rs[r]);
  for (int32_t i = 0; i < ns; i++) cudaStreamDestroy(ss[i]);
}

/* Ranks on one device given different streams are refused, naming the stream. */
static void test_refusals(void) {
  rank_state rs[2] = {{0}};
  lmoe_context *ctxs[2];
  lmoe_comm *comms[2];
  for (int32_t r = 0; r < 2; r++) ctxs[r] = rs[r].ctx = gpu_context(LMOE_GUARD_HOST, NULL);
  char err[256];
  OK(NULL, lmoe_comm_create_local(2, ctxs, comms, err, sizeof err));
  for (int32_t r = 0; r < 2; r++) {
    make_rank(&rs[r], layer_cfg(LMOE_SHARD_EP, r, 2, comms[r]), false);
    lmoe_comm_release(comms[r]);
  }
  const lmoe_forward_args *args[2] = {&rs[0].args, &rs[1].args};
  void *streams[2] = {lmoe_context_stream(rs[0].ctx), lmoe_context_stream(rs[1].ctx)};
  lmoe_status st = lmoe_forward_group(2, ctxs, args, streams);
  CHECK(st == LMOE_ERR_INVALID_ARGUMENT && strstr(lmoe_context_last_error(rs[0].ctx), "streams[1]"),
        "ranks on two streams: %s \"%s\"", lmoe_status_string(st), lmoe_context_last_error(rs[0].ctx));
  /* a shard_size 2 layer without a communicator names the cause */
  lmoe_layer *l = NULL;
  lmoe_layer_config lc = layer_cfg(LMOE_SHARD_TP, 0, 2, NULL);
  st = lmoe_layer_create(rs[0].ctx, &lc, &l);
  CHECK(st != LMOE_OK && !l && strstr(lmoe_context_last_error(rs[0].ctx), "comm"), "no comm: %s \"%s\"",
        lmoe_status_string(st), lmoe_context_last_error(rs[0].ctx));
  for (int32_t r = 0; r < 2; r++) free_rank(&rs[r]);
}

int main(void) {
  if (!test_need_gpu("test_gpu_shard")) return 1;
  M = 0;
  for (int i = 0; i < NREQ; i++) M += req_tokens[i];
  /* LMOE_TEST_NO_CUPTI (tools/gpu-sanitize.sh): CUPTI cannot attach under
     compute-sanitizer; the sharded paths still run there, their CUPTI counts stay 0 and
     only the library's own host-wait counter is checked (the plain run checks both) */
  const char *no_cupti = getenv("LMOE_TEST_NO_CUPTI");
  const bool cupti = !(no_cupti && *no_cupti && strcmp(no_cupti, "0"));
  CUpti_SubscriberHandle sub = NULL;
  if (!cupti)
    printf("SKIPPED: CUPTI's counts of host synchronisations (LMOE_TEST_NO_CUPTI is set); the library's "
           "host-wait counter is still checked\n");
  else if (cuptiSubscribe(&sub, on_runtime, NULL) != CUPTI_SUCCESS ||
           cuptiEnableDomain(1, sub, CUPTI_CB_DOMAIN_RUNTIME_API) != CUPTI_SUCCESS) {
    fprintf(stderr, "CUPTI subscription failed\n");
    return 1;
  }
  bool nccl = lmoe_has_nccl() != 0;
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess) ndev = 0;
  if (!nccl)
    printf("SKIPPED: the NCCL cases (one rank through NCCL): this build has no NCCL (cmake option LMOE_NCCL, "
           "LMOE_NCCL_ROOT); one rank runs as a one-device group instead\n");
  for (int32_t mode = LMOE_SHARD_TP; mode <= LMOE_SHARD_EP; mode++) {
    /* one rank: lmoe_comm_create_local of one cuda context is NCCL's when built with it */
    run_case(mode, 1, mode == LMOE_SHARD_EP, nccl ? "nccl" : "group");
    run_case(mode, 2, false, "group");
    run_case(mode, 3, true, "group");
    run_case(mode, 3, false, "group");
    run_sync_and_graph(mode, 1, nccl ? "nccl" : "group");
    run_sync_and_graph(mode, 3, "group");
    /* a device a rank, through NCCL */
    for (int32_t n = 2; n <= 4 && nccl && n <= ndev; n *= 2) {
      run_case(mode, n, mode == LMOE_SHARD_EP, "devices");
      run_sync_and_graph(mode, n, "devices");
    }
  }
  if (!nccl || ndev < 2)
    printf("SKIPPED: ranks on several devices (%d device%s, %s)\n", ndev, ndev == 1 ? "" : "s",
           nccl ? "NCCL in the build" : "no NCCL in the build");
  if (cupti) cuptiUnsubscribe(sub);
  test_refusals();
  return test_summary();
}
