/* CPU forward vs the float64 reference on fresh random inputs, over shapes, routing
   modes and adapter mixes; guard modes give equal results and the expected counters;
   and the reference itself vs a naive model built from the PEFT-layout arrays. */
#include "test_util.h"

#include <stdint.h>

#define TOL 1e-2 /* rel L2 that fits bf16 storage (h and out are rounded to bf16) */

typedef struct adapter_spec {
  int rank, targets, fused, rslora;
} adapter_spec;

typedef struct case_spec {
  int E, H, I, k, renorm, threads;
  int given_topk;    /* 0: router logits (f32), 1: logits bf16, 2: given ids/weights */
  int one_expert;    /* given routing: every pair on expert 0 */
  int nreq;
  int tokens[16];
  int slots[16];
  int nslots;        /* pool slots; 0: no pool */
  int max_rank;
  adapter_spec ad[8];
} case_spec;

typedef struct built {
  lmoe_context *ctx;
  lmoe_layer *layer;
  lmoe_pool *pool;
  lmoe_batch *batch;
  lmoe_buffer *x, *logits, *ids, *wts, *out, *ref;
  int64_t M;
} built;

static void build(built *b, const case_spec *c, int guard, uint64_t seed) {
  memset(b, 0, sizeof *b);
  b->ctx = test_cpu_context(c->threads, guard);
  lmoe_context *ctx = b->ctx;
  int64_t M = 0;
  for (int i = 0; i < c->nreq; i++) M += c->tokens[i];
  b->M = M;
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = c->E, lc.hidden = c->H, lc.intermediate = c->I, lc.top_k = c->k;
  lc.renormalize = c->renorm;
  lc.max_tokens = (int)M + 3;
  OK(ctx, lmoe_layer_create(ctx, &lc, &b->layer));
  OK(ctx, lmoe_layer_randomize(b->layer, seed, 0.08f));
  if (c->nslots) {
    lmoe_pool_config pc;
    lmoe_pool_config_init(&pc);
    pc.num_slots = c->nslots;
    pc.max_rank = c->max_rank;
    OK(ctx, lmoe_pool_create(b->layer, &pc, &b->pool));
    for (int s = 0; s < c->nslots; s++) {
      if (!c->ad[s].rank) continue;
      lmoe_random_adapter ra;
      lmoe_random_adapter_init(&ra);
      ra.rank = c->ad[s].rank;
      ra.targets = c->ad[s].targets;
      ra.fused = c->ad[s].fused;
      ra.use_rslora = c->ad[s].rslora;
      ra.alpha = 2.0f * (float)ra.rank;
      ra.seed = seed * 31 + (uint64_t)s;
      ra.scale = 0.15f;
      OK(ctx, lmoe_pool_load_random(b->pool, s, &ra));
    }
  }
  OK(ctx, lmoe_batch_create(ctx, &b->batch));
  OK(ctx, lmoe_batch_set(b->batch, b->pool, c->nreq, c->tokens, c->slots));
  b->x = test_buffer(ctx, LMOE_DTYPE_BF16, M, c->H);
  OK(ctx, lmoe_buffer_fill_random(b->x, seed + 11, -1.0f, 1.0f, NULL));
  if (c->given_topk == 2) {
    b->ids = test_buffer(ctx, LMOE_DTYPE_I32, M, c->k);
    b->wts = test_buffer(ctx, LMOE_DTYPE_F32, M, c->k);
    if (c->one_expert)
      OK(ctx, lmoe_buffer_fill(b->ids, 0, NULL));
    else
      OK(ctx, lmoe_buffer_fill_random(b->ids, seed + 12, 0.0f, (float)c->E, NULL));
    OK(ctx, lmoe_buffer_fill_random(b->wts, seed + 13, 0.1f, 1.0f, NULL));
  } else {
    b->logits = test_buffer(ctx, c->given_topk ? LMOE_DTYPE_BF16 : LMOE_DTYPE_F32, M, c->E);
    OK(ctx, lmoe_buffer_fill_random(b->logits, seed + 14, -2.0f, 2.0f, NULL));
  }
  b->out = test_buffer(ctx, LMOE_DTYPE_BF16, M, c->H);
  b->ref = test_buffer(ctx, LMOE_DTYPE_F64, M, c->H);
  if (M) OK(ctx, lmoe_buffer_fill(b->out, 12345.0, NULL)); /* must be overwritten */
}

static void args_of(const built *b, lmoe_forward_args *a, lmoe_buffer *out) {
  lmoe_forward_args_init(a);
  a->layer = b->layer;
  a->pool = b->pool;
  a->batch = b->batch;
  a->x = b->x;
  a->router_logits = b->logits;
  a->topk_ids = b->ids;
  a->topk_weights = b->wts;
  a->out = out;
}

static void unbuild(built *b) {
  lmoe_buffer_release(b->x);
  lmoe_buffer_release(b->logits);
  lmoe_buffer_release(b->ids);
  lmoe_buffer_release(b->wts);
  lmoe_buffer_release(b->out);
  lmoe_buffer_release(b->ref);
  lmoe_batch_release(b->batch);
  lmoe_pool_release(b->pool);
  lmoe_layer_release(b->layer);
  lmoe_context_release(b->ctx);
}

static void describe(const case_spec *c, char *s, size_t n) {
  int len = snprintf(s, n, "E%d H%d I%d k%d renorm%d route%d one%d thr%d req[", c->E, c->H, c->I,
                     c->k, c->renorm, c->given_topk, c->one_expert, c->threads);
  for (int i = 0; i < c->nreq && len < (int)n; i++)
    len += snprintf(s + len, n - (size_t)len, "%d:%d ", c->tokens[i], c->slots[i]);
  if (len < (int)n) len += snprintf(s + len, n - (size_t)len, "] adapters[");
  for (int i = 0; i < c->nslots && len < (int)n; i++)
    len += snprintf(s + len, n - (size_t)len, "r%d t%d f%d rs%d ", c->ad[i].rank, c->ad[i].targets,
                    c->ad[i].fused, c->ad[i].rslora);
  if (len < (int)n) snprintf(s + len, n - (size_t)len, "]");
}

/* Forward and reference; returns rel L2. */
static double check_case(const case_spec *c, int guard, uint64_t seed) {
  built b;
  build(&b, c, guard, seed);
  lmoe_forward_args a;
  args_of(&b, &a, b.out);
  OK(b.ctx, lmoe_forward(b.ctx, &a, NULL));
  args_of(&b, &a, b.ref);
  OK(b.ctx, lmoe_reference_forward(b.ctx, &a));
  lmoe_compare_result r;
  OK(b.ctx, lmoe_buffer_compare(b.out, b.ref, &r));
  char d[512];
  describe(c, d, sizeof d);
  CHECK(r.nonfinite == 0 && r.rel_l2 <= TOL, "%s: rel_l2 %.3g nonfinite %lld", d, r.rel_l2,
        (long long)r.nonfinite);
  if (b.M) CHECK(r.ref_l2 > 0, "%s: reference is all zero", d);
  unbuild(&b);
  return r.rel_l2;
}

static void random_case(case_spec *c) {
  memset(c, 0, sizeof *c);
  c->E = test_randint(1, 12);
  c->H = test_randint(1, 70);
  c->I = test_randint(1, 50);
  c->k = test_randint(1, c->E < 8 ? c->E : 8);
  c->renorm = test_randint(0, 1);
  c->threads = test_randint(1, 3);
  c->given_topk = test_randint(0, 2);
  c->one_expert = c->given_topk == 2 && test_randint(0, 5) == 0;
  c->nslots = test_randint(0, 4);
  c->max_rank = test_randint(1, 12);
  for (int s = 0; s < c->nslots; s++) {
    if (test_randint(0, 4) == 0) continue; /* an empty slot, never used */
    adapter_spec *a = &c->ad[s];
    a->rank = test_randint(1, c->max_rank);
    a->fused = test_randint(0, 2) == 0;
    a->targets = a->fused ? (test_randint(0, 1) ? 3 : 7) : test_randint(1, 7);
    a->rslora = test_randint(0, 1);
  }
  c->nreq = test_randint(0, 7);
  for (int i = 0; i < c->nreq; i++) {
    c->tokens[i] = test_randint(0, 4) == 0 ? 0 : test_randint(1, 60);
    int s = c->nslots ? test_randint(-1, c->nslots - 1) : -1;
    c->slots[i] = s >= 0 && c->ad[s].rank ? s : -1;
  }
}

static void test_random_cases(int n) {
  double worst = 0;
  for (int i = 0; i < n; i++) {
    case_spec c;
    random_case(&c);
    double r = check_case(&c, test_randint(0, 2), test_rand());
    if (r > worst) worst = r;
  }
  printf("random cases: %d, worst rel_l2 %.3g\n", n, worst);
}

/* Named edge cases. */
static void test_edges(void) {
  case_spec c;
  memset(&c, 0, sizeof c);
  c.E = 8, c.H = 40, c.I = 24, c.k = 2, c.renorm = 1, c.threads = 2, c.nslots = 3, c.max_rank = 8;
  c.ad[0] = (adapter_spec){8, 7, 0, 0};
  c.ad[1] = (adapter_spec){3, 7, 1, 1};
  c.ad[2] = (adapter_spec){5, 4, 0, 0}; /* down only */
  /* M = 1 */
  c.nreq = 1, c.tokens[0] = 1, c.slots[0] = 0;
  check_case(&c, LMOE_GUARD_HOST, test_rand());
  /* M = 0, with empty requests */
  c.nreq = 3, c.tokens[0] = c.tokens[1] = c.tokens[2] = 0, c.slots[1] = 1, c.slots[2] = -1;
  check_case(&c, LMOE_GUARD_HOST, test_rand());
  /* all tokens on one expert (given routing), odd M, all adapters */
  c.given_topk = 2, c.one_expert = 1, c.k = 1;
  c.nreq = 4, c.tokens[0] = 37, c.tokens[1] = 0, c.tokens[2] = 51, c.tokens[3] = 13;
  c.slots[0] = 0, c.slots[1] = 1, c.slots[2] = 1, c.slots[3] = 2;
  check_case(&c, LMOE_GUARD_HOST, test_rand());
  /* many experts, few tokens: most experts get none; k = 8 */
  c.E = 64, c.k = 8, c.given_topk = 0, c.one_expert = 0;
  c.nreq = 2, c.tokens[0] = 3, c.tokens[1] = 2, c.slots[0] = -1, c.slots[1] = 2;
  check_case(&c, LMOE_GUARD_ALWAYS, test_rand());
  /* larger tiles, several threads, fused + separate + partial targets together */
  c.E = 4, c.H = 96, c.I = 80, c.k = 2, c.threads = 3, c.renorm = 0;
  c.ad[2] = (adapter_spec){6, 2, 0, 1}; /* up only */
  c.nreq = 5;
  int tok[5] = {130, 7, 0, 64, 99}, sl[5] = {0, -1, 2, 2, 1};
  memcpy(c.tokens, tok, sizeof tok), memcpy(c.slots, sl, sizeof sl);
  check_case(&c, LMOE_GUARD_DEVICE_SYNC, test_rand());
  c.given_topk = 1; /* bf16 logits */
  check_case(&c, LMOE_GUARD_HOST, test_rand());
  /* H and I past the kernel's K chunk (128), not multiples of it; a tile past 64 */
  c.E = 3, c.H = 300, c.I = 200, c.k = 2, c.given_topk = 0, c.max_rank = 16;
  c.ad[0] = (adapter_spec){16, 7, 0, 0};
  c.ad[1] = (adapter_spec){9, 7, 1, 0};
  c.ad[2] = (adapter_spec){13, 5, 0, 1};
  c.nreq = 3;
  int tok2[3] = {70, 41, 29}, sl2[3] = {1, 0, 2};
  memcpy(c.tokens, tok2, sizeof tok2), memcpy(c.slots, sl2, sizeof sl2);
  check_case(&c, LMOE_GUARD_HOST, test_rand());
}

/* The adapters must matter: a test that can't see a wrong LoRA term proves nothing. */
static void test_lora_is_visible(void) {
  case_spec c;
  memset(&c, 0, sizeof c);
  c.E = 4, c.H = 32, c.I = 16, c.k = 2, c.renorm = 1, c.threads = 2, c.nslots = 1, c.max_rank = 8;
  c.ad[0] = (adapter_spec){8, 7, 0, 0};
  c.nreq = 1, c.tokens[0] = 40, c.slots[0] = 0;
  uint64_t seed = test_rand();
  built with, without;
  build(&with, &c, LMOE_GUARD_HOST, seed);
  c.slots[0] = -1;
  build(&without, &c, LMOE_GUARD_HOST, seed);
  lmoe_forward_args a;
  args_of(&with, &a, with.ref);
  OK(with.ctx, lmoe_reference_forward(with.ctx, &a));
  args_of(&without, &a, without.ref);
  OK(without.ctx, lmoe_reference_forward(without.ctx, &a));
  lmoe_compare_result r;
  OK(with.ctx, lmoe_buffer_compare(without.ref, with.ref, &r));
  CHECK(r.rel_l2 > 0.1, "the adapter changes the output by only %.3g (rel L2)", r.rel_l2);
  unbuild(&with);
  unbuild(&without);
}

/* Guard modes x active combinations: equal outputs, and the counters. */
static void test_guards(void) {
  case_spec c;
  memset(&c, 0, sizeof c);
  c.E = 6, c.H = 48, c.I = 32, c.k = 2, c.renorm = 1, c.threads = 2, c.nslots = 2, c.max_rank = 8;
  c.ad[0] = (adapter_spec){8, 7, 0, 0};
  c.ad[1] = (adapter_spec){4, 7, 1, 0};
  c.nreq = 3, c.tokens[0] = 20, c.tokens[1] = 9, c.tokens[2] = 31;
  int combos[3][3] = {{-1, -1, -1}, {0, -1, 1}, {1, 0, 1}}; /* none, some, all */
  for (int combo = 0; combo < 3; combo++) {
    memcpy(c.slots, combos[combo], sizeof combos[combo]);
    uint64_t seed = test_rand();
    uint16_t *outs[3] = {0};
    size_t bytes = 0;
    for (int g = 0; g < 3; g++) {
      built b;
      build(&b, &c, g, seed);
      lmoe_forward_args a;
      args_of(&b, &a, b.out);
      lmoe_context_reset_counters(b.ctx);
      OK(b.ctx, lmoe_forward(b.ctx, &a, NULL));
      lmoe_counters k;
      OK(b.ctx, lmoe_context_counters(b.ctx, &k));
      CHECK(k.forwards == 1, "combo %d guard %d: forwards %llu", combo, g, (unsigned long long)k.forwards);
      if (g == LMOE_GUARD_HOST) {
        CHECK(k.host_waits == 0, "combo %d host: %llu host waits", combo, (unsigned long long)k.host_waits);
        if (combo == 0)
          CHECK(k.lora_launches == 0, "host guard, no adapter: %llu LoRA tasks",
                (unsigned long long)k.lora_launches);
        else
          CHECK(k.lora_launches >= 1, "host guard, active adapters, no LoRA task");
      } else if (g == LMOE_GUARD_DEVICE_SYNC) {
        CHECK(k.host_waits == 1, "combo %d device_sync: %llu host waits (want 1)", combo,
              (unsigned long long)k.host_waits);
        CHECK((k.lora_launches > 0) == (combo > 0), "combo %d device_sync: %llu LoRA tasks", combo,
              (unsigned long long)k.lora_launches);
      } else {
        CHECK(k.host_waits == 0, "combo %d always: %llu host waits", combo, (unsigned long long)k.host_waits);
        CHECK(k.lora_launches >= 1, "always: no LoRA task");
      }
      CHECK(k.launches >= k.lora_launches + 1, "launches %llu", (unsigned long long)k.launches);
      /* a second forward counts one more device_sync wait, no other */
      lmoe_context_reset_counters(b.ctx);
      OK(b.ctx, lmoe_forward(b.ctx, &a, NULL));
      OK(b.ctx, lmoe_context_counters(b.ctx, &k));
      CHECK(k.host_waits == (g == LMOE_GUARD_DEVICE_SYNC ? 1u : 0u), "second forward: %llu waits",
            (unsigned long long)k.host_waits);
      bytes = (size_t)b.M * (size_t)c.H * 2;
      outs[g] = malloc(bytes);
      OK(b.ctx, lmoe_buffer_read(b.out, 0, outs[g], LMOE_DTYPE_BF16, b.M * c.H));
      args_of(&b, &a, b.ref);
      OK(b.ctx, lmoe_reference_forward(b.ctx, &a));
      lmoe_compare_result r;
      OK(b.ctx, lmoe_buffer_compare(b.out, b.ref, &r));
      CHECK(r.rel_l2 <= TOL, "combo %d guard %d: rel_l2 %.3g", combo, g, r.rel_l2);
      unbuild(&b);
    }
    CHECK(memcmp(outs[0], outs[1], bytes) == 0, "combo %d: host and device_sync differ", combo);
    CHECK(memcmp(outs[0], outs[2], bytes) == 0, "combo %d: host and always differ", combo);
    for (int g = 0; g < 3; g++) free(outs[g]);
  }
  /* no pool at all: always has nothing to launch */
  c.nslots = 0;
  memcpy(c.slots, combos[0], sizeof combos[0]);
  built b;
  build(&b, &c, LMOE_GUARD_ALWAYS, test_rand());
  lmoe_forward_args a;
  args_of(&b, &a, b.out);
  lmoe_context_reset_counters(b.ctx);
  OK(b.ctx, lmoe_forward(b.ctx, &a, NULL));
  lmoe_counters k;
  OK(b.ctx, lmoe_context_counters(b.ctx, &k));
  CHECK(k.lora_launches == 0, "no pool: %llu LoRA tasks", (unsigned long long)k.lora_launches);
  unbuild(&b);
}

/* Thread count must not change a bit of the result. */
static void test_thread_independence(void) {
  case_spec c;
  memset(&c, 0, sizeof c);
  c.E = 5, c.H = 72, c.I = 40, c.k = 3, c.renorm = 1, c.nslots = 2, c.max_rank = 8;
  c.ad[0] = (adapter_spec){8, 7, 0, 0};
  c.ad[1] = (adapter_spec){2, 5, 0, 0};
  c.nreq = 3, c.tokens[0] = 100, c.tokens[1] = 17, c.tokens[2] = 60;
  c.slots[0] = 1, c.slots[1] = -1, c.slots[2] = 0;
  uint64_t seed = test_rand();
  uint16_t *o[3];
  const int nthreads[3] = {1, 4, 7}; /* 7 threads also cut smaller tiles */
  for (int i = 0; i < 3; i++) {
    c.threads = nthreads[i];
    built b;
    build(&b, &c, LMOE_GUARD_HOST, seed);
    lmoe_forward_args a;
    args_of(&b, &a, b.out);
    OK(b.ctx, lmoe_forward(b.ctx, &a, NULL));
    o[i] = malloc((size_t)b.M * (size_t)c.H * 2);
    OK(b.ctx, lmoe_buffer_read(b.out, 0, o[i], LMOE_DTYPE_BF16, b.M * c.H));
    unbuild(&b);
  }
  CHECK(memcmp(o[0], o[1], 177u * 72u * 2u) == 0, "1 thread and 4 threads differ");
  CHECK(memcmp(o[0], o[2], 177u * 72u * 2u) == 0, "1 thread and 7 threads differ");
  free(o[0]), free(o[1]), free(o[2]);
}

/* ------------------------------------------------------------------ naive model */

static float bf16_round(float f) { /* round to nearest even, the test's own */
  uint32_t u;
  memcpy(&u, &f, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  memcpy(&f, &u, 4);
  return f;
}

static void fill_bf16_values(float *p, size_t n, float scale) {
  for (size_t i = 0; i < n; i++) p[i] = bf16_round(test_randf(-scale, scale));
}

/* From PEFT-layout arrays, straight from the DESIGN.md formulas; one adapter on
   request 0, none on request 1. fused: gate_up [E, r, H] / [E, 2I, r]. */
static void test_naive_model(int fused) {
  const int E = 3, H = 20, I = 12, k = 2, rg = 3, ru = 5, rd = 4, Mt = 9, M0 = 6;
  lmoe_context *ctx = test_cpu_context(2, LMOE_GUARD_HOST);
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = E, lc.hidden = H, lc.intermediate = I, lc.top_k = k, lc.max_tokens = Mt;
  lmoe_layer *layer;
  OK(ctx, lmoe_layer_create(ctx, &lc, &layer));
  float *w13 = malloc(sizeof(float) * E * 2 * I * H), *w2 = malloc(sizeof(float) * E * H * I);
  fill_bf16_values(w13, (size_t)E * 2 * I * H, 0.2f);
  fill_bf16_values(w2, (size_t)E * H * I, 0.2f);
  OK(ctx, lmoe_layer_set_weights(layer, w13, w2, LMOE_DTYPE_F32));
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = 2, pc.max_rank = 6;
  lmoe_pool *pool;
  OK(ctx, lmoe_pool_create(layer, &pc, &pool));
  int r13 = fused ? rg : rg + ru;
  float *ag = malloc(sizeof(float) * E * rg * H), *bg = malloc(sizeof(float) * E * 2 * I * rg);
  float *au = malloc(sizeof(float) * E * ru * H), *bu = malloc(sizeof(float) * E * I * ru);
  float *ad = malloc(sizeof(float) * E * rd * I), *bd = malloc(sizeof(float) * E * H * rd);
  fill_bf16_values(ag, (size_t)E * rg * H, 0.3f);
  fill_bf16_values(bg, (size_t)E * 2 * I * rg, 0.3f);
  fill_bf16_values(au, (size_t)E * ru * H, 0.3f);
  fill_bf16_values(bu, (size_t)E * I * ru, 0.3f);
  fill_bf16_values(ad, (size_t)E * rd * I, 0.3f);
  fill_bf16_values(bd, (size_t)E * H * rd, 0.3f);
  const float sg = 1.5f, su = 0.75f, sd = 2.0f;
  lmoe_adapter_desc d;
  lmoe_adapter_desc_init(&d);
  d.dtype = LMOE_DTYPE_F32;
  if (fused) {
    d.gate_up = (lmoe_lora_part){ag, bg, rg, sg};
  } else {
    d.gate = (lmoe_lora_part){ag, bg, rg, sg}; /* bg used as [E, I, rg] */
    d.up = (lmoe_lora_part){au, bu, ru, su};
  }
  d.down = (lmoe_lora_part){ad, bd, rd, sd};
  OK(ctx, lmoe_pool_load(pool, 1, &d));
  (void)r13;
  lmoe_batch *batch;
  OK(ctx, lmoe_batch_create(ctx, &batch));
  int tokens[2] = {M0, Mt - M0}, slots[2] = {1, -1};
  OK(ctx, lmoe_batch_set(batch, pool, 2, tokens, slots));
  float *x = malloc(sizeof(float) * Mt * H), *tw = malloc(sizeof(float) * Mt * k);
  int32_t *ids = malloc(sizeof(int32_t) * Mt * k);
  fill_bf16_values(x, (size_t)Mt * H, 1.0f);
  for (int i = 0; i < Mt * k; i++) ids[i] = test_randint(0, E - 1), tw[i] = test_randf(0.1f, 1.0f);
  lmoe_buffer *bx = test_buffer(ctx, LMOE_DTYPE_BF16, Mt, H), *bo = test_buffer(ctx, LMOE_DTYPE_BF16, Mt, H);
  lmoe_buffer *bref = test_buffer(ctx, LMOE_DTYPE_F64, Mt, H), *bexp = test_buffer(ctx, LMOE_DTYPE_F64, Mt, H);
  lmoe_buffer *bid = test_buffer(ctx, LMOE_DTYPE_I32, Mt, k), *bw = test_buffer(ctx, LMOE_DTYPE_F32, Mt, k);
  OK(ctx, lmoe_buffer_write(bx, 0, x, LMOE_DTYPE_F32, Mt * H));
  OK(ctx, lmoe_buffer_write(bid, 0, ids, LMOE_DTYPE_I32, Mt * k));
  OK(ctx, lmoe_buffer_write(bw, 0, tw, LMOE_DTYPE_F32, Mt * k));

  double *expect = calloc((size_t)Mt * H, sizeof(double));
  for (int t = 0; t < Mt; t++) {
    int lora = t < M0;
    for (int j = 0; j < k; j++) {
      int e = ids[t * k + j];
      double g[64], u[64], h[64], y[64], s1[8], s2[8];
      for (int o = 0; o < I; o++) {
        double ga = 0, ua = 0;
        for (int q = 0; q < H; q++) {
          ga += (double)w13[((size_t)e * 2 * I + o) * H + q] * x[t * H + q];
          ua += (double)w13[((size_t)e * 2 * I + I + o) * H + q] * x[t * H + q];
        }
        g[o] = ga, u[o] = ua;
      }
      if (lora) {
        for (int q = 0; q < rg; q++) {
          s1[q] = 0;
          for (int p = 0; p < H; p++) s1[q] += (double)ag[((size_t)e * rg + q) * H + p] * x[t * H + p];
        }
        if (fused) { /* B [2I, r]: gate rows then up rows, one scale */
          for (int o = 0; o < 2 * I; o++) {
            double acc = 0;
            for (int q = 0; q < rg; q++) acc += (double)bg[((size_t)e * 2 * I + o) * rg + q] * s1[q];
            if (o < I) g[o] += sg * acc;
            else u[o - I] += sg * acc;
          }
        } else {
          for (int q = 0; q < ru; q++) {
            s2[q] = 0;
            for (int p = 0; p < H; p++) s2[q] += (double)au[((size_t)e * ru + q) * H + p] * x[t * H + p];
          }
          for (int o = 0; o < I; o++) {
            double acc = 0, acu = 0;
            for (int q = 0; q < rg; q++) acc += (double)bg[((size_t)e * I + o) * rg + q] * s1[q];
            for (int q = 0; q < ru; q++) acu += (double)bu[((size_t)e * I + o) * ru + q] * s2[q];
            g[o] += sg * acc;
            u[o] += su * acu;
          }
        }
      }
      for (int o = 0; o < I; o++) h[o] = bf16_round((float)(g[o] / (1.0 + exp(-g[o])) * u[o]));
      for (int o = 0; o < H; o++) {
        y[o] = 0;
        for (int q = 0; q < I; q++) y[o] += (double)w2[((size_t)e * H + o) * I + q] * h[q];
      }
      if (lora) {
        for (int q = 0; q < rd; q++) {
          s1[q] = 0;
          for (int p = 0; p < I; p++) s1[q] += (double)ad[((size_t)e * rd + q) * I + p] * h[p];
        }
        for (int o = 0; o < H; o++) {
          double acc = 0;
          for (int q = 0; q < rd; q++) acc += (double)bd[((size_t)e * H + o) * rd + q] * s1[q];
          y[o] += sd * acc;
        }
      }
      for (int o = 0; o < H; o++) expect[t * H + o] += (double)tw[t * k + j] * y[o];
    }
  }
  OK(ctx, lmoe_buffer_write(bexp, 0, expect, LMOE_DTYPE_F64, Mt * H));
  lmoe_forward_args a;
  lmoe_forward_args_init(&a);
  a.layer = layer, a.pool = pool, a.batch = batch, a.x = bx, a.topk_ids = bid, a.topk_weights = bw;
  a.out = bref;
  OK(ctx, lmoe_reference_forward(ctx, &a));
  a.out = bo;
  OK(ctx, lmoe_forward(ctx, &a, NULL));
  lmoe_compare_result r1, r2;
  OK(ctx, lmoe_buffer_compare(bref, bexp, &r1));
  OK(ctx, lmoe_buffer_compare(bo, bexp, &r2));
  CHECK(r1.rel_l2 <= 1e-5, "fused %d: reference vs naive PEFT model: rel_l2 %.3g", fused, r1.rel_l2);
  CHECK(r2.rel_l2 <= TOL, "fused %d: cpu vs naive PEFT model: rel_l2 %.3g", fused, r2.rel_l2);
  free(expect), free(x), free(tw), free(ids), free(w13), free(w2);
  free(ag), free(bg), free(au), free(bu), free(ad), free(bd);
  lmoe_buffer_release(bx), lmoe_buffer_release(bo), lmoe_buffer_release(bref);
  lmoe_buffer_release(bexp), lmoe_buffer_release(bid), lmoe_buffer_release(bw);
  lmoe_batch_release(batch);
  lmoe_pool_release(pool);
  lmoe_layer_release(layer);
  lmoe_context_release(ctx);
}

int main(int argc, char **argv) {
  test_seed("test_numerics");
  int n = argc > 1 ? atoi(argv[1]) : 60;
  test_naive_model(0);
  test_naive_model(1);
  test_lora_is_visible();
  test_edges();
  test_guards();
  test_thread_independence();
  test_random_cases(n);
  return test_summary();
}
