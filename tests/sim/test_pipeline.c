/* Pipelining on one batch object, on the simulated device, whose device thread lags
   the host (here 150 µs per operation, so the host runs whole rings ahead of it and a
   place reused too early is read by its copy after it was rewritten):
   - set -> forward -> set -> forward ... on one batch, eager and through graphs (ours
     and one captured with cudaStreamBeginCapture and replayed with cudaGraphLaunch),
     for batches that go as a kernel parameter (no waits at all) and batches of more
     than 400 requests that go through the batch's ring of pinned staging: no forced
     host wait, at most one backpressure wait per set once the ring is full, and every
     forward's output (each kept in its own buffer, read only at the end) equal to the
     float64 reference of the batch it was launched with;
   - adapter reloads every N forwards into a slot the queued forwards read: no forced
     wait, and each forward computes the adapter that was loaded when it was enqueued,
     with the default staging (one chunk per load) and with a staging chunk so small
     that a load turns both buffers over several times. */
#define _GNU_SOURCE /* setenv */
#include "gpu_common.h"
#include "internal.h" /* ctx->staging.chunk */

enum { K = 12 };

/* n requests over the case's M tokens, on random slots or none (some requests empty). */
static void random_requests(gpu_case *c, int n) {
  int left = c->M;
  for (int i = 0; i < n; i++) {
    int t = i == n - 1 ? left : (int)(test_rand() % 3 == 0 ? 0 : test_rand() % (uint64_t)(2 * c->M / n + 1));
    if (t > left) t = left;
    c->req_tok[i] = t;
    c->req_slot[i] = (int)(test_rand() % (uint64_t)(c->S + 1)) - 1;
    left -= t;
  }
  c->nreq = n;
  OK(c->ctx, lmoe_batch_set(c->batch, c->pool, n, c->req_tok, c->req_slot));
}

static void use_requests(gpu_case *c, const int *tok, const int *slot, int n) {
  memcpy(c->req_tok, tok, sizeof(int) * (size_t)n);
  memcpy(c->req_slot, slot, sizeof(int) * (size_t)n);
  c->nreq = n;
}

/* The out of each forward against the reference of its requests. */
static void check_outputs(gpu_case *c, lmoe_buffer **outs, int **tok, int **slot, int n, const char *what) {
  double *ref = malloc(sizeof(double) * (size_t)c->M * c->H);
  lmoe_buffer *keep = c->out;
  int wrong = 0;
  for (int i = 0; i < K; i++) {
    use_requests(c, tok[i], slot[i], n);
    case_reference(c, ref, 1);
    c->out = outs[i];
    int64_t bad;
    double err = case_compare(c, ref, &bad);
    if (bad || err > 1e-2) {
      wrong++;
      printf("  %s: forward %d: rel L2 %.3e, %lld non-finite\n", what, i, err, (long long)bad);
    }
  }
  c->out = keep;
  CHECK(wrong == 0, "%s: %d of %d forwards differ from the reference of the batch they were launched with",
        what, wrong, K);
  free(ref);
}

typedef enum { EAGER, GRAPH, CUDA_GRAPH } loop_mode;
static const char *mode_name[] = {"eager", "lmoe graph", "cudaGraphLaunch"};

static void one_batch_loop(loop_mode mode, int depth, int nreq) {
  cudaStream_t s = NULL;
  if (mode == CUDA_GRAPH) CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess, "stream");
  lmoe_context *ctx = gpu_context(LMOE_GUARD_ALWAYS, s);
  gpu_case c;
  case_init(&c, ctx, 16, 128, 64, 4, 128, 4, 16, 0, 0);
  for (int q = 0; q < 4; q++) case_load_adapter(&c, q, 7, q == 3, 4 << (q % 3), 8, 16);
  lmoe_batch_release(c.batch);
  lmoe_batch_config bc;
  lmoe_batch_config_init(&bc);
  CHECK(bc.staging_depth == 4, "default staging depth %d", bc.staging_depth);
  bc.staging_depth = depth;
  OK(ctx, lmoe_batch_create_with(ctx, &bc, &c.batch));
  free(c.req_tok), free(c.req_slot);
  c.req_tok = malloc(sizeof(int) * (size_t)nreq);
  c.req_slot = malloc(sizeof(int) * (size_t)nreq);
  int *tok[K], *slot[K];
  lmoe_buffer *outs[K];
  int64_t sh[2] = {c.M, c.H};
  for (int i = 0; i < K; i++) {
    tok[i] = malloc(sizeof(int) * (size_t)nreq);
    slot[i] = malloc(sizeof(int) * (size_t)nreq);
    OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sh, &outs[i]));
  }
  random_requests(&c, nreq);
  lmoe_forward_args a;
  case_args(&c, &a);
  OK(ctx, lmoe_forward(ctx, &a, NULL)); /* eager once: storage grown, version on the device */
  lmoe_graph *g = NULL;
  cudaGraph_t cg = NULL;
  cudaGraphExec_t ce = NULL;
  if (mode == GRAPH) {
    OK(ctx, lmoe_graph_begin(ctx, NULL));
    OK(ctx, lmoe_forward(ctx, &a, NULL));
    OK(ctx, lmoe_graph_end(ctx, NULL, &g));
  } else if (mode == CUDA_GRAPH) {
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal) == cudaSuccess, "begin capture");
    lmoe_status st = lmoe_forward(ctx, &a, NULL);
    CHECK(cudaStreamEndCapture(s, &cg) == cudaSuccess && st == LMOE_OK, "capture: %s", lmoe_context_last_error(ctx));
    CHECK(cudaGraphInstantiate(&ce, cg, 0) == cudaSuccess, "instantiate");
  }
  OK(ctx, lmoe_context_synchronize(ctx, NULL));
  lmoe_buffer_desc od;
  OK(ctx, lmoe_buffer_describe(c.out, &od));
  lmoe_wait_counters w0 = wait_counters(ctx), w1;
  for (int i = 0; i < K; i++) {
    random_requests(&c, nreq);
    memcpy(tok[i], c.req_tok, sizeof(int) * (size_t)nreq);
    memcpy(slot[i], c.req_slot, sizeof(int) * (size_t)nreq);
    if (mode == EAGER) {
      a.out = outs[i];
      OK(ctx, lmoe_forward(ctx, &a, NULL));
      continue;
    }
    if (mode == GRAPH) OK(ctx, lmoe_graph_launch(g, NULL));
    else CHECK(cudaGraphLaunch(ce, s) == cudaSuccess, "graph launch");
    lmoe_buffer_desc sd;
    OK(ctx, lmoe_buffer_describe(outs[i], &sd));
    CHECK(cudaMemcpyAsync(sd.data, od.data, od.bytes, cudaMemcpyDeviceToDevice,
                          (cudaStream_t)lmoe_context_stream(ctx)) == cudaSuccess, "snapshot copy");
  }
  w1 = wait_counters(ctx);
  uint64_t forced = w1.forced - w0.forced, bp = w1.backpressure - w0.backpressure;
  bool ring = nreq > 400;
  /* the warm-up's place was drained by the synchronize: the loop's sets wait only
     for places its own copies read, from the depth-th set on */
  uint64_t most = ring ? (uint64_t)(K - depth + 1 > 0 ? K - depth + 1 : 0) : 0;
  printf("one batch, %-15s depth %d, %3d requests: %d sets and launches, host waits %llu (forced %llu, "
         "backpressure %llu)\n",
         mode_name[mode], depth, nreq, K, (unsigned long long)(w1.host_waits - w0.host_waits),
         (unsigned long long)forced, (unsigned long long)bp);
  CHECK(forced == 0, "%s, depth %d: %llu forced waits", mode_name[mode], depth, (unsigned long long)forced);
  CHECK(bp <= most, "%s, depth %d: %llu backpressure waits, at most %llu expected", mode_name[mode], depth,
        (unsigned long long)bp, (unsigned long long)most);
  /* the device lags far behind: a small ring fills, so the places are reused while
     copies out of them are queued (what the reference checks below catch if a place
     is rewritten too early) */
  if (ring && depth <= K / 2) CHECK(bp > 0, "%s, depth %d: the ring never filled", mode_name[mode], depth);
  OK(ctx, lmoe_context_synchronize(ctx, NULL));
  char what[64];
  snprintf(what, sizeof what, "%s depth %d, %d requests", mode_name[mode], depth, nreq);
  check_outputs(&c, outs, tok, slot, nreq, what);
  for (int i = 0; i < K; i++) {
    lmoe_buffer_release(outs[i]);
    free(tok[i]), free(slot[i]);
  }
  if (ce) cudaGraphExecDestroy(ce);
  if (cg) cudaGraphDestroy(cg);
  case_free(&c);
  lmoe_graph_release(g);
  lmoe_context_release(ctx);
  if (s) cudaStreamDestroy(s);
}

/* Reloads of slot 0, alternating two adapters, every `every` forwards of one batch set
   before each forward; each forward's output in its own buffer. */
static void reload_loop(size_t chunk, int every) {
  enum { N = 40 };
  lmoe_context *ctx = gpu_context(LMOE_GUARD_HOST, NULL);
  gpu_case c;
  case_init(&c, ctx, 16, 128, 64, 4, 96, 2, 16, 0, 0);
  if (chunk) ctx->staging.chunk = chunk; /* before the staging is made, at the first load */
  host_adapter ver[2];
  case_load_adapter(&c, 0, 7, 0, 16, 8, 12);
  ver[0] = c.ad[0];
  memset(&c.ad[0], 0, sizeof c.ad[0]);
  case_load_adapter(&c, 0, 7, 1, 16, 16, 16);
  ver[1] = c.ad[0];
  memset(&c.ad[0], 0, sizeof c.ad[0]);
  case_load_adapter(&c, 1, 5, 0, 4, 4, 4);
  lmoe_pool_memory pm;
  OK(ctx, lmoe_pool_get_memory(c.pool, &pm));
  int slots[5] = {0, -1, 1, 0, 0};
  case_set_batch(&c, 5, slots);
  int tok[5], sl[5];
  memcpy(tok, c.req_tok, sizeof tok);
  memcpy(sl, c.req_slot, sizeof sl);
  lmoe_forward_args a;
  case_args(&c, &a);
  lmoe_buffer *outs[N];
  int which[N];
  int64_t sh[2] = {c.M, c.H};
  for (int i = 0; i < N; i++) OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sh, &outs[i]));
  OK(ctx, lmoe_forward(ctx, &a, NULL));
  OK(ctx, lmoe_context_synchronize(ctx, NULL));
  lmoe_wait_counters w0 = wait_counters(ctx), w1;
  lmoe_counters c0, c1;
  OK(ctx, lmoe_context_counters(ctx, &c0));
  int cur = 1, loads = 0;
  for (int i = 0; i < N; i++) {
    if (i % every == 0) {
      cur ^= 1;
      lmoe_adapter_desc d;
      lmoe_adapter_desc_init(&d);
      d.dtype = LMOE_DTYPE_F32;
      desc_part(&d.gate, &ver[cur].gate);
      desc_part(&d.up, &ver[cur].up);
      desc_part(&d.gate_up, &ver[cur].gate_up);
      desc_part(&d.down, &ver[cur].down);
      OK(ctx, lmoe_pool_load(c.pool, 0, &d));
      loads++;
    }
    OK(ctx, lmoe_batch_set(c.batch, c.pool, 5, tok, sl));
    a.out = outs[i];
    OK(ctx, lmoe_forward(ctx, &a, NULL));
    which[i] = cur;
  }
  w1 = wait_counters(ctx);
  OK(ctx, lmoe_context_counters(ctx, &c1));
  uint64_t forced = w1.forced - w0.forced, bp = w1.backpressure - w0.backpressure;
  printf("reload every %d forwards, staging chunk %zu for slots of %lld bytes: %d loads, %d forwards, "
         "%llu uploads, host waits %llu (forced %llu, backpressure %llu)\n",
         every, chunk ? chunk : (size_t)LMOE_STAGING_CHUNK, (long long)pm.slot_bytes, loads, N,
         (unsigned long long)(c1.uploads - c0.uploads), (unsigned long long)(w1.host_waits - w0.host_waits),
         (unsigned long long)forced, (unsigned long long)bp);
  CHECK(forced == 0, "reload every %d: %llu forced waits", every, (unsigned long long)forced);
  if (!chunk) CHECK(c1.uploads - c0.uploads >= (uint64_t)loads, "one upload per load at least");
  OK(ctx, lmoe_context_synchronize(ctx, NULL));
  /* each forward against the reference with the adapter it was enqueued after */
  double *ref[2];
  use_requests(&c, tok, sl, 5);
  for (int v = 0; v < 2; v++) {
    ref[v] = malloc(sizeof(double) * (size_t)c.M * c.H);
    c.ad[0] = ver[v];
    case_reference(&c, ref[v], 1);
  }
  memset(&c.ad[0], 0, sizeof c.ad[0]);
  CHECK(rel_diff(ref[0], ref[1], (size_t)c.M * c.H) > 1e-2, "the two adapters give the same output");
  lmoe_buffer *keep = c.out;
  int wrong = 0;
  for (int i = 0; i < N; i++) {
    c.out = outs[i];
    int64_t bad;
    double err = case_compare(&c, ref[which[i]], &bad);
    if (bad || err > 1e-2) {
      wrong++;
      printf("  forward %d (adapter %d): rel L2 %.3e, %lld non-finite\n", i, which[i], err, (long long)bad);
    }
    lmoe_buffer_release(outs[i]);
  }
  c.out = keep;
  CHECK(wrong == 0, "reload every %d, chunk %zu: %d of %d forwards did not compute the adapter loaded before them",
        every, chunk, wrong, N);
  for (int v = 0; v < 2; v++) {
    free(ref[v]);
    part_free(&ver[v].gate), part_free(&ver[v].up), part_free(&ver[v].gate_up), part_free(&ver[v].down);
  }
  case_free(&c);
  lmoe_context_release(ctx);
}

/* The batch config: defaults, the depth's range, an older (smaller) struct size. */
static void batch_config(void) {
  lmoe_context *ctx = gpu_context(LMOE_GUARD_HOST, NULL);
  lmoe_batch *b = NULL;
  lmoe_batch_config bc;
  lmoe_batch_config_init(&bc);
  bc.staging_depth = 0;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_batch_create_with(ctx, &bc, &b));
  CHECK(b == NULL && strstr(lmoe_context_last_error(ctx), "staging_depth"), "%s", lmoe_context_last_error(ctx));
  bc.staging_depth = 65;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_batch_create_with(ctx, &bc, &b));
  bc.staging_depth = 64;
  OK(ctx, lmoe_batch_create_with(ctx, &bc, &b));
  lmoe_batch_release(b);
  OK(ctx, lmoe_batch_create_with(ctx, NULL, &b));
  lmoe_batch_release(b);
  lmoe_context_release(ctx);
}

int main(void) {
  setenv("LMOE_SIM_DELAY_US", "150", 0); /* read when the simulated device starts */
  if (!test_need_gpu("sim_test_pipeline")) return 1;
  batch_config();
  for (int m = EAGER; m <= CUDA_GRAPH; m++) {
    one_batch_loop((loop_mode)m, 4, 48);  /* kernel parameter: no staging, no wait */
    one_batch_loop((loop_mode)m, 4, 420); /* through the ring */
  }
  one_batch_loop(EAGER, 1, 420);
  one_batch_loop(GRAPH, 2, 430);
  one_batch_loop(EAGER, 16, 420);
  reload_loop(0, 10);
  reload_loop(0, 1);
  reload_loop(7000, 5); /* several chunks per load: both buffers turn over */
  return test_summary();
}
