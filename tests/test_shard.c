/* Sharded layers on the cpu backend (docs/design.md, "Sharding"): for tensor and expert
   parallel at 2, 3 and 4 ranks, with adapters of mixed ranks and requests without one,
   the ranks' summed output equals the unsharded layer's within one bf16 rounding and
   the float64 reference within the tolerance the unsharded layer meets. Ranks run on
   threads (lmoe_forward per rank) and from one thread (lmoe_forward_group). The
   checkpoint and PEFT loaders give a rank its slice; bad shard configs are refused
   naming the field. */
#include "test_util.h"

#include <pthread.h>
#include <sys/stat.h>

#define TOL 1e-2 /* rel L2 against the float64 reference, as in test_numerics.c */

enum { E = 7, H = 48, I = 40, K = 2, NREQ = 5, SLOTS = 4, MAXR = 16 };
static const int32_t req_tokens[NREQ] = {13, 1, 22, 0, 31};
static const int32_t req_slots[NREQ] = {0, LMOE_NO_ADAPTER, 1, 2, 3};
static int64_t M;
static const char *work;

#include "shard_case.h"

static lmoe_context *cpu_ctx(int32_t threads) {
  lmoe_context_config cc;
  lmoe_context_config_init(&cc);
  cc.backend = LMOE_BACKEND_CPU;
  cc.threads = threads;
  lmoe_context *c = NULL;
  char err[256];
  if (lmoe_context_create(&cc, &c, err, sizeof err)) {
    fprintf(stderr, "context: %s\n", err);
    exit(1);
  }
  return c;
}

static void *run_rank(void *v) {
  rank_state *r = v;
  r->st = lmoe_forward(r->ctx, &r->args, NULL);
  return NULL;
}

static void read_bf16(lmoe_context *c, lmoe_buffer *b, float *dst) {
  OK(c, lmoe_buffer_read(b, 0, dst, LMOE_DTYPE_F32, M * H));
}

/* |a - b| within one bf16 rounding of the larger (the sum's float32 order differs). */
static int64_t off_by_more_than_a_rounding(const float *a, const float *b, int64_t n, double *worst) {
  int64_t bad = 0;
  *worst = 0;
  for (int64_t i = 0; i < n; i++) {
    double d = fabs((double)a[i] - (double)b[i]);
    double m = fmax(fabs((double)a[i]), fabs((double)b[i]));
    double ulp = m > 0 ? ldexp(1.0, ilogb(m) - 7) : 0;
    if (d > *worst) *worst = d;
    if (d > ulp + 1e-30) bad++;
  }
  return bad;
}

/* Whether to set the shards' weights from the whole layer's arrays (set_weights) rather
   than lmoe_layer_randomize. */
typedef struct case_opts {
  bool set_weights, adapters, given_routing, group;
} case_opts;

static void run_case(int32_t mode, int32_t n, case_opts o) {
  char what[128];
  snprintf(what, sizeof what, "%s n=%d%s%s%s%s", mode == LMOE_SHARD_TP ? "TP" : "EP", (int)n,
           o.adapters ? " adapters" : " no adapters", o.given_routing ? " given routing" : " router",
           o.set_weights ? " set_weights" : " randomize", o.group ? " group" : " threads");
  /* the unsharded layer and its reference */
  rank_state ref = {0};
  ref.ctx = cpu_ctx(2);
  lmoe_layer_config lc = layer_cfg(LMOE_SHARD_TP, 0, 1, NULL);
  OK(ref.ctx, lmoe_layer_create(ref.ctx, &lc, &ref.layer));
  OK(ref.ctx, lmoe_layer_randomize(ref.layer, 7, 0.15f));
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = SLOTS, pc.max_rank = MAXR;
  OK(ref.ctx, lmoe_pool_create(ref.layer, &pc, &ref.pool));
  if (o.adapters) load_adapters(ref.ctx, ref.pool);
  make_inputs(&ref, o.adapters, o.given_routing);
  OK(ref.ctx, lmoe_forward(ref.ctx, &ref.args, NULL));
  float *want = malloc((size_t)(M * H) * sizeof *want), *got = malloc((size_t)(M * H) * sizeof *got);
  float *first = malloc((size_t)(M * H) * sizeof *first);
  read_bf16(ref.ctx, ref.out, want);
  lmoe_buffer *f64 = NULL;
  int64_t s2[2] = {M, H};
  OK(ref.ctx, lmoe_buffer_create(ref.ctx, LMOE_DTYPE_F64, LMOE_MEMORY_HOST, 2, s2, &f64));
  lmoe_forward_args ra = ref.args;
  ra.out = f64;
  OK(ref.ctx, lmoe_reference_forward(ref.ctx, &ra));
  lmoe_compare_result cr;
  OK(ref.ctx, lmoe_buffer_compare(ref.out, f64, &cr));
  double ref_tol = cr.rel_l2;

  float *w13 = NULL, *w2 = NULL;
  if (o.set_weights) {
    w13 = malloc((size_t)E * 2 * I * H * sizeof *w13);
    w2 = malloc((size_t)E * H * I * sizeof *w2);
    lmoe_buffer *b13, *b2;
    OK(ref.ctx, lmoe_layer_weights(ref.layer, 0, &b13));
    OK(ref.ctx, lmoe_layer_weights(ref.layer, 1, &b2));
    OK(ref.ctx, lmoe_buffer_read(b13, 0, w13, LMOE_DTYPE_F32, (int64_t)E * 2 * I * H));
    OK(ref.ctx, lmoe_buffer_read(b2, 0, w2, LMOE_DTYPE_F32, (int64_t)E * H * I));
  }

  rank_state rs[4] = {{0}};
  lmoe_context *ctxs[4];
  lmoe_comm *comms[4];
  for (int32_t r = 0; r < n; r++) ctxs[r] = rs[r].ctx = cpu_ctx(1);
  char err[256];
  OK(NULL, lmoe_comm_create_local(n, ctxs, comms, err, sizeof err));
  int32_t held = 0;
  for (int32_t r = 0; r < n; r++) {
    lmoe_context *c = rs[r].ctx;
    CHECK(lmoe_comm_rank(comms[r]) == r && lmoe_comm_size(comms[r]) == n, "%s: comm %d is rank %d of %d", what,
          (int)r, (int)lmoe_comm_rank(comms[r]), (int)lmoe_comm_size(comms[r]));
    lmoe_layer_config sc = layer_cfg(mode, r, n, comms[r]);
    OK(c, lmoe_layer_create(c, &sc, &rs[r].layer));
    lmoe_comm_release(comms[r]); /* the layer keeps it */
    if (o.set_weights) OK(c, lmoe_layer_set_weights(rs[r].layer, w13, w2, LMOE_DTYPE_F32));
    else OK(c, lmoe_layer_randomize(rs[r].layer, 7, 0.15f));
    lmoe_buffer *b13;
    lmoe_buffer_desc d;
    OK(c, lmoe_layer_weights(rs[r].layer, 0, &b13));
    OK(c, lmoe_buffer_describe(b13, &d));
    held += (int32_t)(mode == LMOE_SHARD_EP ? d.shape[0] : d.shape[1] / 2);
    /* the remainder rule: the first (D % n) ranks hold one more */
    int32_t D = mode == LMOE_SHARD_EP ? E : I;
    int32_t expect = D / n + (r < D % n);
    CHECK((mode == LMOE_SHARD_EP ? d.shape[0] : d.shape[1] / 2) == expect, "%s: rank %d holds %lld, expected %d",
          what, (int)r, (long long)(mode == LMOE_SHARD_EP ? d.shape[0] : d.shape[1] / 2), (int)expect);
    lmoe_layer_config back;
    OK(c, lmoe_layer_get_config(rs[r].layer, &back));
    CHECK(back.num_experts == E && back.intermediate == I && back.shard_rank == r && back.shard_size == n &&
              back.shard_mode == mode,
          "%s: get_config gives the whole layer's shapes and the shard", what);
    OK(c, lmoe_pool_create(rs[r].layer, &pc, &rs[r].pool));
    if (o.adapters) load_adapters(c, rs[r].pool);
    make_inputs(&rs[r], o.adapters, o.given_routing);
  }
  CHECK(held == (mode == LMOE_SHARD_EP ? E : I), "%s: the ranks hold %d of %d", what, (int)held,
        mode == LMOE_SHARD_EP ? E : I);

  for (int rep = 0; rep < 2; rep++) { /* twice: the second round reuses the group */
    if (o.group) {
      const lmoe_forward_args *args[4];
      for (int32_t r = 0; r < n; r++) args[r] = &rs[r].args;
      OK(ctxs[0], lmoe_forward_group(n, ctxs, args, NULL));
    } else {
      pthread_t t[4];
      for (int32_t r = 0; r < n; r++) pthread_create(&t[r], NULL, run_rank, &rs[r]);
      for (int32_t r = 0; r < n; r++) pthread_join(t[r], NULL);
      for (int32_t r = 0; r < n; r++)
        CHECK(rs[r].st == LMOE_OK, "%s: rank %d: %s", what, (int)r, lmoe_context_last_error(rs[r].ctx));
    }
    for (int32_t r = 0; r < n; r++) {
      read_bf16(rs[r].ctx, rs[r].out, r ? got : first);
      if (r) {
        CHECK(!memcmp(got, first, (size_t)(M * H) * sizeof *got), "%s: rank %d's output differs from rank 0's",
              what, (int)r);
      }
    }
    double worst;
    int64_t bad = off_by_more_than_a_rounding(first, want, M * H, &worst);
    CHECK(bad == 0, "%s: %lld of %lld elements differ from the unsharded layer's by more than a bf16 rounding "
                    "(worst %.3g)", what, (long long)bad, (long long)(M * H), worst);
    if (getenv("SHARD_VERBOSE")) {
      int64_t same = 0;
      double mx = 0;
      for (int64_t i = 0; i < M * H; i++) same += first[i] == want[i], mx = fmax(mx, fabs(want[i]));
      printf("%s: %lld of %lld equal, worst %.3g, max |out| %.3g, unsharded vs f64 %.3g\n", what, (long long)same,
             (long long)(M * H), worst, mx, ref_tol);
    }
    lmoe_compare_result c2;
    OK(rs[0].ctx, lmoe_buffer_compare(rs[0].out, f64, &c2)); /* f64 belongs to ref's context: compare waits */
    CHECK(c2.rel_l2 <= TOL && c2.rel_l2 <= ref_tol * 1.5 + 1e-4 && c2.nonfinite == 0,
          "%s: rel_l2 %.3g against the float64 reference (unsharded: %.3g)", what, c2.rel_l2, ref_tol);
    if (rep == 0) lmoe_buffer_fill(rs[0].out, 0.0, NULL); /* the next round writes it again */
  }
  lmoe_counters cn;
  OK(rs[0].ctx, lmoe_context_counters(rs[0].ctx, &cn));
  CHECK(cn.forwards == 2, "%s: rank 0 counted %llu forwards", what, (unsigned long long)cn.forwards);
  /* the reference refuses a shard */
  lmoe_buffer *f64r = NULL;
  OK(rs[0].ctx, lmoe_buffer_create(rs[0].ctx, LMOE_DTYPE_F64, LMOE_MEMORY_HOST, 2, s2, &f64r));
  lmoe_forward_args a0 = rs[0].args;
  a0.out = f64r;
  FAILS(rs[0].ctx, LMOE_ERR_UNSUPPORTED, lmoe_reference_forward(rs[0].ctx, &a0));
  lmoe_buffer_release(f64r);
  for (int32_t r = 0; r < n; r++) free_rank(&rs[r]);
  lmoe_buffer_release(f64);
  free_rank(&ref);
  free(want), free(got), free(first), free(w13), free(w2);
}

/* ---------------------------------------------------------------- refusals */

static void *fail_rank(void *v) {
  rank_state *r = v;
  r->st = lmoe_forward(r->ctx, &r->args, NULL);
  return NULL;
}

static void test_refusals(void) {
  lmoe_context *c = cpu_ctx(1), *c2 = cpu_ctx(1);
  lmoe_layer *l = NULL;
  lmoe_layer_config lc = layer_cfg(LMOE_SHARD_TP, 0, 2, NULL);
#define REFUSES(want, field, cfgexpr)                                                                 \
  do {                                                                                                \
    lmoe_layer_config cc_ = (cfgexpr);                                                                \
    lmoe_status st_ = lmoe_layer_create(c, &cc_, &l);                                                 \
    CHECK(st_ == (want) && !l && strstr(lmoe_context_last_error(c), field), "%s: %s, \"%s\"", field,  \
          lmoe_status_string(st_), lmoe_context_last_error(c));                                       \
  } while (0)
  REFUSES(LMOE_ERR_INVALID_ARGUMENT, "comm", lc); /* shard_size 2 without a communicator */
  REFUSES(LMOE_ERR_INVALID_ARGUMENT, "shard_size", layer_cfg(LMOE_SHARD_TP, 0, 0, NULL));
  REFUSES(LMOE_ERR_INVALID_ARGUMENT, "shard_rank", layer_cfg(LMOE_SHARD_TP, 2, 2, NULL));
  REFUSES(LMOE_ERR_INVALID_ARGUMENT, "shard_rank", layer_cfg(LMOE_SHARD_TP, -1, 2, NULL));
  REFUSES(LMOE_ERR_INVALID_ARGUMENT, "shard_mode", layer_cfg(5, 0, 2, NULL));
  REFUSES(LMOE_ERR_INVALID_ARGUMENT, "num_experts", layer_cfg(LMOE_SHARD_EP, 0, E + 1, NULL));
  lmoe_layer_config big = layer_cfg(LMOE_SHARD_TP, 0, 2, NULL);
  big.intermediate = 1;
  REFUSES(LMOE_ERR_INVALID_ARGUMENT, "intermediate", big);
  lmoe_comm *cm[2];
  lmoe_context *pair[2] = {c, c2}, *same[2] = {c, c};
  char err[256];
  CHECK(lmoe_comm_create_local(2, same, cm, err, sizeof err) == LMOE_ERR_INVALID_ARGUMENT && strstr(err, "ctxs[1]"),
        "one context twice: %s", err);
  CHECK(lmoe_comm_create_local(0, pair, cm, err, sizeof err) == LMOE_ERR_INVALID_ARGUMENT && strstr(err, "n"),
        "0 ranks: %s", err);
  OK(c, lmoe_comm_create_local(2, pair, cm, err, sizeof err));
  lmoe_comm *wrapped = NULL;
  REFUSES(LMOE_ERR_INVALID_ARGUMENT, "comm", layer_cfg(LMOE_SHARD_TP, 1, 2, cm[0])); /* rank 1 with rank 0's */
  REFUSES(LMOE_ERR_INVALID_ARGUMENT, "comm", layer_cfg(LMOE_SHARD_TP, 0, 3, cm[0]));
  REFUSES(LMOE_ERR_INVALID_ARGUMENT, "comm", layer_cfg(LMOE_SHARD_TP, 1, 2, cm[1])); /* cm[1] is c2's */
  REFUSES(LMOE_ERR_INVALID_ARGUMENT, "comm", layer_cfg(LMOE_SHARD_TP, 0, 2, (lmoe_comm *)(void *)c2));
  CHECK(lmoe_comm_rank(NULL) == -1 && lmoe_comm_size((const lmoe_comm *)(const void *)c) == -1,
        "rank and size of a non-communicator are -1");
  /* without NCCL a wrap is refused, saying why */
  if (!lmoe_has_nccl()) FAILS(c, LMOE_ERR_UNSUPPORTED, lmoe_comm_wrap_nccl(c, (void *)c, &wrapped));
  CHECK(!wrapped, "a refused wrap gives no communicator");

  /* a rank whose forward is refused: it still joins, and the other rank returns an
     error instead of waiting; neither output is written */
  rank_state rs[2] = {{0}};
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  for (int32_t r = 0; r < 2; r++) {
    rs[r].ctx = pair[r];
    lmoe_context_retain(pair[r]);
    lmoe_layer_config sc = layer_cfg(LMOE_SHARD_EP, r, 2, cm[r]);
    OK(pair[r], lmoe_layer_create(pair[r], &sc, &rs[r].layer));
    OK(pair[r], lmoe_layer_randomize(rs[r].layer, 3, 0.1f));
    OK(pair[r], lmoe_pool_create(rs[r].layer, &pc, &rs[r].pool));
    make_inputs(&rs[r], false, false);
    OK(pair[r], lmoe_buffer_fill(rs[r].out, 5.0, NULL));
    lmoe_comm_release(cm[r]); /* the layer keeps it */
  }
  lmoe_forward_args bad = rs[1].args;
  bad.x = rs[1].out; /* out and x the same: refused */
  rs[1].args = bad;
  pthread_t t[2];
  for (int r = 0; r < 2; r++) pthread_create(&t[r], NULL, fail_rank, &rs[r]);
  for (int r = 0; r < 2; r++) pthread_join(t[r], NULL);
  CHECK(rs[1].st == LMOE_ERR_INVALID_ARGUMENT && strstr(lmoe_context_last_error(pair[1]), "out"),
        "the refused rank: %s \"%s\"", lmoe_status_string(rs[1].st), lmoe_context_last_error(pair[1]));
  CHECK(rs[0].st == LMOE_ERR_STATE && strstr(lmoe_context_last_error(pair[0]), "rank 1"),
        "the other rank: %s \"%s\"", lmoe_status_string(rs[0].st), lmoe_context_last_error(pair[0]));
  float v;
  OK(pair[0], lmoe_buffer_read(rs[0].out, 0, &v, LMOE_DTYPE_F32, 1));
  CHECK(v == 5.0f, "rank 0's output was written (%g) after rank 1 failed", v);
  /* the group refuses ranks out of order, and runs them in order */
  lmoe_context *rev[2] = {pair[1], pair[0]};
  const lmoe_forward_args *ga[2] = {&rs[1].args, &rs[0].args};
  FAILS(pair[1], LMOE_ERR_INVALID_ARGUMENT, lmoe_forward_group(2, rev, ga, NULL));
  rs[1].args.x = rs[1].x;
  ga[0] = &rs[0].args, ga[1] = &rs[1].args;
  OK(pair[0], lmoe_forward_group(2, pair, ga, NULL));
  /* and the threads still meet after the failed round */
  for (int r = 0; r < 2; r++) pthread_create(&t[r], NULL, fail_rank, &rs[r]);
  for (int r = 0; r < 2; r++) pthread_join(t[r], NULL);
  CHECK(rs[0].st == LMOE_OK && rs[1].st == LMOE_OK, "after a failed round: %s %s", lmoe_status_string(rs[0].st),
        lmoe_status_string(rs[1].st));
  for (int r = 0; r < 2; r++) free_rank(&rs[r]);
  lmoe_context_release(c);
  lmoe_context_release(c2);
#undef REFUSES
}

/* ---------------------------------------------------------------- loaders */

/* A checkpoint of the whole layer, per-expert or fused: each rank's layer gets its
   slice, equal to the slice of an unsharded layer loaded from it. */
static void test_checkpoint(bool fused, int32_t mode, int32_t n) {
  lmoe_context *rc = cpu_ctx(1);
  lmoe_layer_config lc = layer_cfg(LMOE_SHARD_TP, 0, 1, NULL);
  lmoe_layer *whole;
  OK(rc, lmoe_layer_create(rc, &lc, &whole));
  OK(rc, lmoe_layer_randomize(whole, 21, 0.2f));
  float *w13 = malloc((size_t)E * 2 * I * H * sizeof *w13), *w2 = malloc((size_t)E * H * I * sizeof *w2);
  lmoe_buffer *b13, *b2;
  OK(rc, lmoe_layer_weights(whole, 0, &b13));
  OK(rc, lmoe_layer_weights(whole, 1, &b2));
  OK(rc, lmoe_buffer_read(b13, 0, w13, LMOE_DTYPE_F32, (int64_t)E * 2 * I * H));
  OK(rc, lmoe_buffer_read(b2, 0, w2, LMOE_DTYPE_F32, (int64_t)E * H * I));
  char path[512];
  snprintf(path, sizeof path, "%s/ck_%s.safetensors", work, fused ? "fused" : "per_expert");
  lmoe_tensor_entry *t = calloc(3 * E, sizeof *t);
  char (*names)[96] = calloc(3 * E, sizeof *names);
  int32_t nt = 0;
  if (fused) {
    t[0] = (lmoe_tensor_entry){"model.layers.0.mlp.experts.gate_up_proj", LMOE_DTYPE_F32, 3, {E, 2 * I, H}, w13};
    t[1] = (lmoe_tensor_entry){"model.layers.0.mlp.experts.down_proj", LMOE_DTYPE_F32, 3, {E, H, I}, w2};
    nt = 2;
  } else {
    for (int32_t e = 0; e < E; e++)
      for (int32_t q = 0; q < 3; q++) {
        static const char *pn[3] = {"gate_proj", "up_proj", "down_proj"};
        snprintf(names[nt], sizeof names[nt], "model.layers.0.mlp.experts.%d.%s.weight", (int)e, pn[q]);
        const float *src = q < 2 ? w13 + ((size_t)e * 2 + (size_t)q) * I * H : w2 + (size_t)e * H * I;
        t[nt] = (lmoe_tensor_entry){names[nt], LMOE_DTYPE_F32, 2, {q < 2 ? I : H, q < 2 ? H : I}, src};
        nt++;
      }
  }
  OK(rc, lmoe_safetensors_write(rc, path, nt, t, 0, NULL, NULL));
  lmoe_context *ctxs[4];
  lmoe_comm *cm[4];
  for (int32_t r = 0; r < n; r++) ctxs[r] = cpu_ctx(1);
  OK(NULL, lmoe_comm_create_local(n, ctxs, cm, NULL, 0));
  for (int32_t r = 0; r < n; r++) {
    lmoe_layer_config sc = layer_cfg(mode, r, n, cm[r]);
    lmoe_layer *l;
    OK(ctxs[r], lmoe_layer_create(ctxs[r], &sc, &l));
    lmoe_checkpoint *ck;
    OK(ctxs[r], lmoe_checkpoint_open(ctxs[r], path, &ck));
    OK(ctxs[r], lmoe_checkpoint_load_layer(ck, 0, l, NULL));
    lmoe_checkpoint_close(ck);
    lmoe_buffer *s13, *s2;
    lmoe_buffer_desc d13, d2;
    OK(ctxs[r], lmoe_layer_weights(l, 0, &s13));
    OK(ctxs[r], lmoe_layer_weights(l, 1, &s2));
    lmoe_buffer_describe(s13, &d13);
    lmoe_buffer_describe(s2, &d2);
    const uint16_t *g13 = d13.data, *g2 = d2.data;
    const uint16_t *x13, *x2;
    lmoe_buffer_desc w13d, w2d;
    lmoe_buffer_describe(b13, &w13d);
    lmoe_buffer_describe(b2, &w2d);
    x13 = w13d.data, x2 = w2d.data;
    int32_t e0 = 0, ne = E, i0 = 0, ni = I;
    int32_t D = mode == LMOE_SHARD_EP ? E : I, q = D / n, m = D % n;
    int32_t lo = r * q + (r < m ? r : m), cnt = q + (r < m);
    if (mode == LMOE_SHARD_EP) e0 = lo, ne = cnt;
    else i0 = lo, ni = cnt;
    int64_t bad = 0;
    for (int32_t le = 0; le < ne; le++) {
      int32_t e = e0 + le;
      for (int32_t half = 0; half < 2; half++)
        for (int32_t o = 0; o < ni; o++)
          for (int32_t h = 0; h < H; h++)
            bad += g13[(((size_t)le * 2 + half) * ni + o) * H + h] !=
                   x13[(((size_t)e * 2 + half) * I + i0 + o) * H + h];
      for (int32_t h = 0; h < H; h++)
        for (int32_t o = 0; o < ni; o++)
          bad += g2[((size_t)le * H + h) * ni + o] != x2[((size_t)e * H + h) * I + i0 + o];
    }
    CHECK(bad == 0, "checkpoint %s %s n=%d rank %d: %lld weights are not the whole layer's slice",
          fused ? "fused" : "per-expert", mode == LMOE_SHARD_EP ? "EP" : "TP", (int)n, (int)r, (long long)bad);
    lmoe_layer_release(l);
    lmoe_comm_release(cm[r]);
    lmoe_context_release(ctxs[r]);
  }
  free(t), free(names), free(w13), free(w2);
  lmoe_layer_release(whole);
  lmoe_context_release(rc);
}

/* A PEFT adapter into sharded pools: the summed output equals the unsharded layer's. */
static void test_peft(int32_t mode, int32_t n, int32_t layout) {
  char dir[512];
  snprintf(dir, sizeof dir, "%s/peft_%d", work, (int)layout);
  lmoe_context *rc = cpu_ctx(1);
  lmoe_peft_synthetic sp;
  lmoe_peft_synthetic_init(&sp);
  sp.layout = layout, sp.num_layers = 1, sp.num_experts = E, sp.hidden = H, sp.intermediate = I;
  sp.rank = 6, sp.alpha = 12, sp.scale = 0.2f, sp.seed = 5;
  OK(rc, lmoe_peft_write_synthetic(rc, dir, &sp));
  rank_state ref = {0};
  ref.ctx = rc;
  lmoe_layer_config lc = layer_cfg(LMOE_SHARD_TP, 0, 1, NULL);
  OK(rc, lmoe_layer_create(rc, &lc, &ref.layer));
  OK(rc, lmoe_layer_randomize(ref.layer, 9, 0.15f));
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = SLOTS, pc.max_rank = MAXR;
  OK(rc, lmoe_pool_create(ref.layer, &pc, &ref.pool));
  lmoe_peft *pf;
  OK(rc, lmoe_peft_open(rc, dir, &pf));
  for (int32_t s = 0; s < SLOTS; s++) {
    char name[16];
    snprintf(name, sizeof name, "a%d", (int)s);
    OK(rc, lmoe_pool_load_peft(ref.pool, name, pf, 0, NULL));
  }
  make_inputs(&ref, true, false);
  OK(rc, lmoe_forward(rc, &ref.args, NULL));
  float *want = malloc((size_t)(M * H) * sizeof *want), *got = malloc((size_t)(M * H) * sizeof *got);
  read_bf16(rc, ref.out, want);
  rank_state rs[4] = {{0}};
  lmoe_context *ctxs[4];
  lmoe_comm *cm[4];
  for (int32_t r = 0; r < n; r++) ctxs[r] = rs[r].ctx = cpu_ctx(1);
  OK(NULL, lmoe_comm_create_local(n, ctxs, cm, NULL, 0));
  const lmoe_forward_args *ga[4];
  for (int32_t r = 0; r < n; r++) {
    lmoe_layer_config sc = layer_cfg(mode, r, n, cm[r]);
    OK(ctxs[r], lmoe_layer_create(ctxs[r], &sc, &rs[r].layer));
    lmoe_comm_release(cm[r]);
    OK(ctxs[r], lmoe_layer_randomize(rs[r].layer, 9, 0.15f));
    OK(ctxs[r], lmoe_pool_create(rs[r].layer, &pc, &rs[r].pool));
    lmoe_peft *p2;
    OK(ctxs[r], lmoe_peft_open(ctxs[r], dir, &p2));
    for (int32_t s = 0; s < SLOTS; s++) {
      char name[16];
      snprintf(name, sizeof name, "a%d", (int)s);
      OK(ctxs[r], lmoe_pool_load_peft(rs[r].pool, name, p2, 0, NULL));
    }
    lmoe_peft_close(p2);
    make_inputs(&rs[r], true, false);
    ga[r] = &rs[r].args;
  }
  OK(ctxs[0], lmoe_forward_group(n, ctxs, ga, NULL));
  read_bf16(ctxs[n - 1], rs[n - 1].out, got);
  double worst;
  int64_t bad = off_by_more_than_a_rounding(got, want, M * H, &worst);
  CHECK(bad == 0, "peft %s %s n=%d: %lld elements off by more than a bf16 rounding (worst %.3g)",
        layout == LMOE_PEFT_FUSED ? "fused" : "per-expert", mode == LMOE_SHARD_EP ? "EP" : "TP", (int)n,
        (long long)bad, worst);
  for (int32_t r = 0; r < n; r++) free_rank(&rs[r]);
  lmoe_peft_close(pf);
  free_rank(&ref);
  free(want), free(got);
}

int main(int argc, char **argv) {
  work = argc > 1 ? argv[1] : "work_test_shard";
  mkdir(work, 0755);
  M = 0;
  for (int i = 0; i < NREQ; i++) M += req_tokens[i];
  for (int32_t mode = LMOE_SHARD_TP; mode <= LMOE_SHARD_EP; mode++)
    for (int32_t n = 2; n <= 4; n++) {
      run_case(mode, n, (case_opts){.adapters = true, .given_routing = n == 3, .group = false});
      run_case(mode, n, (case_opts){.adapters = true, .set_weights = true, .group = true});
      run_case(mode, n, (case_opts){.adapters = false, .given_routing = n != 3, .group = n == 2});
    }
  test_refusals();
  for (int32_t fused = 0; fused <= 1; fused++)
    for (int32_t mode = LMOE_SHARD_TP; mode <= LMOE_SHARD_EP; mode++) test_checkpoint(fused, mode, 3);
  test_checkpoint(false, LMOE_SHARD_TP, 4);
  test_peft(LMOE_SHARD_TP, 3, LMOE_PEFT_PER_EXPERT);
  test_peft(LMOE_SHARD_EP, 3, LMOE_PEFT_PER_EXPERT);
  test_peft(LMOE_SHARD_TP, 2, LMOE_PEFT_FUSED);
  test_peft(LMOE_SHARD_EP, 4, LMOE_PEFT_FUSED);
  return test_summary();
}
