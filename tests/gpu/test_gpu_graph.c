/* Graphs through the public API: a forward captured once under guard always, replayed
   after lmoe_batch_set with other adapter mixes (none included, same M, new request
   splits). Each replay must match the float64 reference (lmoe_reference_forward) and
   be bitwise equal to an eager forward of the same batch: the same kernels with the
   same parameters run in the same order, and none of them uses atomics whose order
   could change a sum. Replays still in flight when the batch changes compute the batch
   they were launched with. Also: the counters a capture and a replay leave, the refusals
   (end without begin, begin twice), and a capture spoiled by a failed forward. */
#include "gpu_common.h"

static void read_out(gpu_case *c, float *o) {
  OK(c->ctx, lmoe_buffer_read(c->out, 0, o, LMOE_DTYPE_F32, (int64_t)c->M * c->H));
}

static double rel_l2_f(const float *a, const double *ref, size_t n, int64_t *nonfinite) {
  double num = 0, den = 0;
  *nonfinite = 0;
  for (size_t i = 0; i < n; i++) {
    if (!isfinite(a[i])) {
      (*nonfinite)++;
      continue;
    }
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* The library's float64 reference of the case's current batch, into ref. */
static void library_reference(gpu_case *c, lmoe_buffer *href, double *ref) {
  lmoe_forward_args a;
  case_args(c, &a);
  a.out = href;
  OK(c->ctx, lmoe_reference_forward(c->ctx, &a));
  OK(c->ctx, lmoe_buffer_read(href, 0, ref, LMOE_DTYPE_F64, (int64_t)c->M * c->H));
}

static void test_replay(void) {
  lmoe_context *ctx = gpu_context(LMOE_GUARD_ALWAYS, NULL);
  gpu_case c;
  case_init(&c, ctx, 16, 256, 192, 4, 300 + (int)(test_rand() % 64), 4, 32, 0, 0);
  case_load_adapter(&c, 0, 7, 0, 16, 8, 16);
  case_load_adapter(&c, 1, 7, 1, 32, 32, 4);
  case_load_adapter(&c, 2, 3, 0, 8, 4, 1);
  case_load_adapter(&c, 3, 4, 0, 1, 1, 24);
  /* Captured with fewer active adapters than the replays use (one slot, and an empty
     request on another): every replay must still receive its whole metadata. */
  int capture_mix[6] = {0, 1, -1, -1, -1, 0};
  case_set_batch(&c, 6, capture_mix);
  c.req_tok[0] += c.req_tok[1]; /* request 1 (slot 1) gets no tokens */
  c.req_tok[1] = 0;
  OK(ctx, lmoe_batch_set(c.batch, c.pool, 6, c.req_tok, c.req_slot));
  lmoe_forward_args a;
  case_args(&c, &a);
  OK(ctx, lmoe_forward(ctx, &a, NULL)); /* eager once: kernels loaded before the capture */
  OK(ctx, lmoe_context_synchronize(ctx, NULL));

  lmoe_graph *g = NULL;
  FAILS(ctx, LMOE_ERR_STATE, lmoe_graph_end(ctx, NULL, &g)); /* nothing begun */
  CHECK(g == NULL, "a failed end gives no graph");
  lmoe_counters c0, c1;
  lmoe_context_counters(ctx, &c0);
  OK(ctx, lmoe_graph_begin(ctx, NULL));
  FAILS(ctx, LMOE_ERR_STATE, lmoe_graph_begin(ctx, NULL)); /* one capture at a time */
  OK(ctx, lmoe_forward(ctx, &a, NULL));
  OK(ctx, lmoe_graph_end(ctx, NULL, &g));
  CHECK(g != NULL, "graph made");
  lmoe_context_counters(ctx, &c1);
  CHECK(c1.forwards == c0.forwards && c1.launches == c0.launches && c1.uploads == c0.uploads,
        "a capture runs nothing, so it counts nothing (forwards %llu -> %llu, launches %llu -> %llu)",
        (unsigned long long)c0.forwards, (unsigned long long)c1.forwards,
        (unsigned long long)c0.launches, (unsigned long long)c1.launches);

  size_t n = (size_t)c.M * c.H;
  float *og = malloc(sizeof(float) * n), *oe = malloc(sizeof(float) * n);
  double *ref = malloc(sizeof(double) * n);
  int64_t sh[2] = {c.M, c.H};
  lmoe_buffer *href = NULL;
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_F64, LMOE_MEMORY_HOST, 2, sh, &href));
  int mixes[3][6] = {{2, -1, 1, 3, 0, -1}, {-1, -1, -1, -1, -1, -1}, {3, 3, 1, 1, 0, 2}};
  const char *names[3] = {"mixed", "none", "all with adapters"};
  for (int m = 0; m < 3; m++) {
    case_set_batch(&c, 6, mixes[m]);
    OK(ctx, lmoe_buffer_fill(c.out, NAN, NULL));
    lmoe_context_counters(ctx, &c0);
    OK(ctx, lmoe_graph_launch(g, NULL));
    lmoe_context_counters(ctx, &c1);
    CHECK(c1.launches - c0.launches == 1 && c1.forwards - c0.forwards == 1,
          "a replay counts 1 launch and the 1 forward it holds (got %llu, %llu)",
          (unsigned long long)(c1.launches - c0.launches), (unsigned long long)(c1.forwards - c0.forwards));
    read_out(&c, og);
    library_reference(&c, href, ref);
    int64_t bad;
    double err = rel_l2_f(og, ref, n, &bad);
    OK(ctx, lmoe_buffer_fill(c.out, NAN, NULL));
    OK(ctx, lmoe_forward(ctx, &a, NULL));
    read_out(&c, oe);
    size_t diff = 0;
    for (size_t i = 0; i < n; i++) diff += memcmp(&og[i], &oe[i], sizeof(float)) != 0;
    printf("replay %d (%s): rel_l2 vs reference %.2e, %zu of %zu values differ from eager; split",
           m, names[m], err, diff, n);
    for (int q = 0; q < 6; q++) printf(" %d:%d", c.req_tok[q], c.req_slot[q]);
    printf("\n");
    CHECK(bad == 0 && err < 1e-2, "replay %d (%s): rel L2 %.3e vs the reference, %lld non-finite", m,
          names[m], err, (long long)bad);
    CHECK(diff == 0, "replay %d (%s): %zu values differ from an eager forward of the same batch", m,
          names[m], diff);
  }

  /* Replays in flight while the batch changes: each lmoe_graph_launch is followed at
     once by lmoe_batch_set of the next mix, with no wait by the caller, and a
     stream-ordered copy keeps each replay's output. Every replay must compute the batch
     as it was when it was launched: the set may not rewrite the staging a launched but
     not yet started replay will read (it waits, counted, instead). */
  enum { PIPE = 6 };
  int pipe_mix[PIPE][6] = {{0, 1, 2, 3, -1, 0}, {-1, -1, -1, -1, -1, -1}, {3, 3, 3, 3, 3, 3},
                           {2, -1, 1, -1, 0, -1}, {1, 0, 3, 2, 1, 0}, {0, 0, 0, -1, 2, 2}};
  int pipe_tok[PIPE][6], pipe_slot[PIPE][6];
  lmoe_buffer *snap[PIPE];
  lmoe_buffer_desc od, sd;
  OK(ctx, lmoe_buffer_describe(c.out, &od));
  case_set_batch(&c, 6, pipe_mix[0]);
  OK(ctx, lmoe_context_synchronize(ctx, NULL));
  lmoe_context_counters(ctx, &c0);
  for (int r = 0; r < PIPE; r++) {
    for (int q = 0; q < 6; q++) pipe_tok[r][q] = c.req_tok[q], pipe_slot[r][q] = c.req_slot[q];
    OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sh, &snap[r]));
    OK(ctx, lmoe_buffer_describe(snap[r], &sd));
    OK(ctx, lmoe_graph_launch(g, NULL));
    CHECK(cudaMemcpyAsync(sd.data, od.data, od.bytes, cudaMemcpyDeviceToDevice,
                          (cudaStream_t)lmoe_context_stream(ctx)) == cudaSuccess, "snapshot copy");
    if (r + 1 < PIPE) case_set_batch(&c, 6, pipe_mix[r + 1]);
  }
  lmoe_context_counters(ctx, &c1);
  printf("replays in flight: %d batch sets made %llu counted waits\n", PIPE - 1,
         (unsigned long long)(c1.host_waits - c0.host_waits));
  for (int r = 0; r < PIPE; r++) {
    for (int q = 0; q < 6; q++) c.req_tok[q] = pipe_tok[r][q], c.req_slot[q] = pipe_slot[r][q];
    OK(ctx, lmoe_batch_set(c.batch, c.pool, 6, c.req_tok, c.req_slot));
    OK(ctx, lmoe_buffer_read(snap[r], 0, og, LMOE_DTYPE_F32, (int64_t)n));
    library_reference(&c, href, ref);
    int64_t bad;
    double err = rel_l2_f(og, ref, n, &bad);
    CHECK(bad == 0 && err < 1e-2, "replay %d launched before the next batch set: rel L2 %.3e, %lld non-finite",
          r, err, (long long)bad);
    lmoe_buffer_release(snap[r]);
  }

  /* A launch on another stream first waits (on the device) for the replays launched
     before it, so the wait of a later batch set covers those too: replays queued on
     the context's stream, then one on s2, then a set; all of them compute mix 0. */
  cudaStream_t s2;
  CHECK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking) == cudaSuccess, "stream");
  lmoe_buffer *snap2[2] = {NULL, NULL};
  lmoe_buffer_desc sd2[2];
  for (int i = 0; i < 2; i++) {
    OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sh, &snap2[i]));
    OK(ctx, lmoe_buffer_describe(snap2[i], &sd2[i]));
  }
  case_set_batch(&c, 6, pipe_mix[0]);
  OK(ctx, lmoe_context_synchronize(ctx, NULL));
  for (int i = 0; i < 4; i++) OK(ctx, lmoe_graph_launch(g, NULL));
  CHECK(cudaMemcpyAsync(sd2[0].data, od.data, od.bytes, cudaMemcpyDeviceToDevice,
                        (cudaStream_t)lmoe_context_stream(ctx)) == cudaSuccess, "copy");
  OK(ctx, lmoe_graph_launch(g, s2));
  CHECK(cudaMemcpyAsync(sd2[1].data, od.data, od.bytes, cudaMemcpyDeviceToDevice, s2) == cudaSuccess, "copy");
  for (int q = 0; q < 6; q++) pipe_tok[0][q] = c.req_tok[q], pipe_slot[0][q] = c.req_slot[q];
  case_set_batch(&c, 6, pipe_mix[2]);
  CHECK(cudaStreamSynchronize(s2) == cudaSuccess, "stream 2");
  OK(ctx, lmoe_context_synchronize(ctx, NULL));
  for (int q = 0; q < 6; q++) c.req_tok[q] = pipe_tok[0][q], c.req_slot[q] = pipe_slot[0][q];
  OK(ctx, lmoe_batch_set(c.batch, c.pool, 6, c.req_tok, c.req_slot));
  library_reference(&c, href, ref);
  for (int i = 0; i < 2; i++) {
    OK(ctx, lmoe_buffer_read(snap2[i], 0, og, LMOE_DTYPE_F32, (int64_t)n));
    int64_t bad;
    double err = rel_l2_f(og, ref, n, &bad);
    CHECK(bad == 0 && err < 1e-2, "%s before a batch set: rel L2 %.3e, %lld non-finite",
          i ? "the replay on a second stream" : "replays on the context's stream", err, (long long)bad);
    lmoe_buffer_release(snap2[i]);
  }
  CHECK(cudaStreamDestroy(s2) == cudaSuccess, "destroy stream 2");

  /* The captured batch's staging has room for a bounded request count: a set beyond it
     is refused, and forwards refuse the batch until a set that fits succeeds. */
  {
    enum { BIG = 400 };
    int32_t tk[BIG], sl[BIG];
    for (int q = 0; q < BIG; q++) tk[q] = q < c.M % BIG ? c.M / BIG + 1 : c.M / BIG, sl[q] = q % 5 - 1;
    FAILS(ctx, LMOE_ERR_STATE, lmoe_batch_set(c.batch, c.pool, BIG, tk, sl));
    CHECK(strstr(lmoe_context_last_error(ctx), "captured in a graph"), "%s", lmoe_context_last_error(ctx));
    FAILS(ctx, LMOE_ERR_STATE, lmoe_forward(ctx, &a, NULL));
    CHECK(strstr(lmoe_context_last_error(ctx), "set it again"), "%s", lmoe_context_last_error(ctx));
    case_set_batch(&c, 6, pipe_mix[3]);
    OK(ctx, lmoe_graph_launch(g, NULL));
    read_out(&c, og);
    library_reference(&c, href, ref);
    int64_t bad;
    double err = rel_l2_f(og, ref, n, &bad);
    CHECK(bad == 0 && err < 1e-2, "replay after a refused set: rel L2 %.3e", err);
  }

  lmoe_buffer_release(href);
  free(og), free(oe), free(ref);

  /* A forward that fails during a capture spoils it: the end discards it. */
  OK(ctx, lmoe_graph_begin(ctx, NULL));
  OK(ctx, lmoe_context_set_guard(ctx, LMOE_GUARD_DEVICE_SYNC));
  FAILS(ctx, LMOE_ERR_UNSUPPORTED, lmoe_forward(ctx, &a, NULL));
  OK(ctx, lmoe_context_set_guard(ctx, LMOE_GUARD_ALWAYS));
  lmoe_graph *g2 = NULL;
  FAILS(ctx, LMOE_ERR_UNSUPPORTED, lmoe_graph_end(ctx, NULL, &g2));
  CHECK(g2 == NULL, "a spoiled capture gives no graph");
  /* and the context captures again afterwards */
  OK(ctx, lmoe_graph_begin(ctx, NULL));
  OK(ctx, lmoe_forward(ctx, &a, NULL));
  OK(ctx, lmoe_graph_end(ctx, NULL, &g2));
  OK(ctx, lmoe_graph_launch(g2, NULL));
  OK(ctx, lmoe_context_synchronize(ctx, NULL));

  /* The graphs keep the context alive: release it first. */
  case_free(&c);
  lmoe_context_release(ctx);
  lmoe_graph_release(g2);
  lmoe_graph_release(g);
  lmoe_graph_release(NULL);
}

int main(void) {
  if (!test_need_gpu("test_gpu_graph")) return 1;
  test_replay();
  return test_summary();
}
