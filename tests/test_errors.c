/* Bad input: every call returns the right status with a message, never crashes. */
#include "test_util.h"

static lmoe_context *ctx;
static lmoe_layer *layer;
static lmoe_pool *pool;
static lmoe_batch *batch;
static lmoe_buffer *x, *logits, *ids, *wts, *out, *ref;
enum { E = 4, H = 16, I = 8, K = 2, MAXT = 20, M = 10 };

static void setup(void) {
  ctx = test_cpu_context(2, LMOE_GUARD_HOST);
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = E, lc.hidden = H, lc.intermediate = I, lc.top_k = K, lc.max_tokens = MAXT;
  OK(ctx, lmoe_layer_create(ctx, &lc, &layer));
  OK(ctx, lmoe_layer_randomize(layer, 1, 0.1f));
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = 3, pc.max_rank = 4;
  OK(ctx, lmoe_pool_create(layer, &pc, &pool));
  lmoe_random_adapter ra;
  lmoe_random_adapter_init(&ra);
  ra.rank = 4;
  OK(ctx, lmoe_pool_load_random(pool, 0, &ra));
  OK(ctx, lmoe_batch_create(ctx, &batch));
  int tok[2] = {6, 4}, sl[2] = {0, -1};
  OK(ctx, lmoe_batch_set(batch, pool, 2, tok, sl));
  x = test_buffer(ctx, LMOE_DTYPE_BF16, M, H);
  OK(ctx, lmoe_buffer_fill_random(x, 2, -1, 1, NULL));
  logits = test_buffer(ctx, LMOE_DTYPE_F32, M, E);
  OK(ctx, lmoe_buffer_fill_random(logits, 3, -1, 1, NULL));
  ids = test_buffer(ctx, LMOE_DTYPE_I32, M, K);
  OK(ctx, lmoe_buffer_fill_random(ids, 4, 0, E, NULL));
  wts = test_buffer(ctx, LMOE_DTYPE_F32, M, K);
  OK(ctx, lmoe_buffer_fill_random(wts, 5, 0, 1, NULL));
  out = test_buffer(ctx, LMOE_DTYPE_BF16, M, H);
  ref = test_buffer(ctx, LMOE_DTYPE_F64, M, H);
}

static void good_args(lmoe_forward_args *a) {
  lmoe_forward_args_init(a);
  a->layer = layer, a->pool = pool, a->batch = batch, a->x = x, a->router_logits = logits;
  a->out = out;
}

static void test_context_errors(void) {
  char err[128] = "";
  lmoe_context *c = NULL;
  CHECK(lmoe_context_create(NULL, NULL, err, sizeof err) == LMOE_ERR_INVALID_ARGUMENT && err[0],
        "NULL out: %s", err);
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.struct_size = 3;
  err[0] = 0;
  CHECK(lmoe_context_create(&cfg, &c, err, sizeof err) == LMOE_ERR_INVALID_ARGUMENT && err[0] && !c,
        "bad struct_size: %s", err);
  lmoe_context_config_init(&cfg);
  cfg.threads = -1;
  err[0] = 0;
  CHECK(lmoe_context_create(&cfg, &c, err, sizeof err) == LMOE_ERR_INVALID_ARGUMENT && err[0],
        "threads -1: %s", err);
  lmoe_context_config_init(&cfg);
  cfg.guard = 7;
  err[0] = 0;
  CHECK(lmoe_context_create(&cfg, &c, err, sizeof err) == LMOE_ERR_INVALID_ARGUMENT && err[0],
        "guard 7: %s", err);
  lmoe_context_config_init(&cfg);
  cfg.backend = 9;
  err[0] = 0;
  CHECK(lmoe_context_create(&cfg, &c, err, sizeof err) == LMOE_ERR_INVALID_ARGUMENT && err[0],
        "backend 9: %s", err);
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_context_set_guard(ctx, 3));
  CHECK(lmoe_context_set_guard(NULL, 0) == LMOE_ERR_INVALID_ARGUMENT, "set_guard NULL");
  CHECK(lmoe_context_counters(NULL, NULL) == LMOE_ERR_INVALID_ARGUMENT, "counters NULL");
  CHECK(lmoe_context_last_error(NULL)[0] != 0, "last_error(NULL) says something");
  /* release functions take NULL */
  lmoe_context_release(NULL);
  lmoe_buffer_release(NULL);
  lmoe_layer_release(NULL);
  lmoe_pool_release(NULL);
  lmoe_batch_release(NULL);
  test_passed++;
}

static void test_buffer_errors(void) {
  lmoe_buffer *b = NULL;
  int64_t shape[2] = {3, 4}, neg[2] = {3, -1};
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_buffer_create(ctx, 99, LMOE_MEMORY_HOST, 2, shape, &b));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_buffer_create(ctx, LMOE_DTYPE_F32, 5, 2, shape, &b));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_buffer_create(ctx, LMOE_DTYPE_F32, 0, 0, shape, &b));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_buffer_create(ctx, LMOE_DTYPE_F32, 0, 5, shape, &b));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_buffer_create(ctx, LMOE_DTYPE_F32, 0, 2, NULL, &b));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_buffer_create(ctx, LMOE_DTYPE_F32, 0, 2, neg, &b));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_buffer_create(ctx, LMOE_DTYPE_F32, 0, 2, shape, NULL));
  CHECK(lmoe_buffer_create(NULL, LMOE_DTYPE_F32, 0, 2, shape, &b) == LMOE_ERR_INVALID_ARGUMENT,
        "NULL context");
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_buffer_wrap(ctx, LMOE_DTYPE_F32, 0, 2, shape, NULL, &b));
  float v[4];
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_buffer_write(x, 0, NULL, LMOE_DTYPE_F32, 1));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_buffer_write(x, M * H - 2, v, LMOE_DTYPE_F32, 4));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_buffer_write(x, -1, v, LMOE_DTYPE_F32, 1));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_buffer_read(x, 0, v, 42, 1));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_buffer_read(x, 0, v, LMOE_DTYPE_F32, -3));
  CHECK(lmoe_buffer_read(NULL, 0, v, LMOE_DTYPE_F32, 1) == LMOE_ERR_INVALID_ARGUMENT, "read NULL");
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_buffer_fill_random(x, 1, 1.0f, 0.0f, NULL));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_buffer_fill_random(x, 1, 0.0f, INFINITY, NULL));
  lmoe_compare_result r;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_buffer_compare(x, logits, &r));
  CHECK(lmoe_buffer_compare(x, NULL, &r) == LMOE_ERR_INVALID_ARGUMENT, "compare NULL");
  /* a handle of the wrong kind is refused, not trusted */
  CHECK(lmoe_buffer_fill((lmoe_buffer *)batch, 0, NULL) == LMOE_ERR_INVALID_ARGUMENT, "wrong handle");
}

static void test_layer_pool_errors(void) {
  lmoe_layer_config lc;
  lmoe_layer *l = NULL;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_layer_create(ctx, NULL, &l));
  lmoe_layer_config_init(&lc);
  lc.num_experts = E, lc.hidden = H, lc.intermediate = I;
  lc.struct_size = 4;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_layer_create(ctx, &lc, &l));
  lmoe_layer_config_init(&lc);
  lc.num_experts = 0, lc.hidden = H, lc.intermediate = I;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_layer_create(ctx, &lc, &l));
  lc.num_experts = 4, lc.top_k = 5;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_layer_create(ctx, &lc, &l));
  lc.top_k = 2, lc.max_tokens = 0;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_layer_create(ctx, &lc, &l));
  CHECK(l == NULL, "failed create leaves *out NULL");
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_layer_set_expert(layer, E, NULL, NULL, NULL, LMOE_DTYPE_F32));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_layer_set_weights(layer, NULL, NULL, LMOE_DTYPE_I32));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_layer_randomize(layer, 1, -1.0f));

  lmoe_pool_config pc;
  lmoe_pool *p = NULL;
  lmoe_pool_config_init(&pc);
  pc.struct_size = 1;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_create(layer, &pc, &p));
  lmoe_pool_config_init(&pc);
  pc.max_rank = 0;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_create(layer, &pc, &p));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_create(layer, NULL, &p));
  lmoe_random_adapter ra;
  lmoe_random_adapter_init(&ra);
  ra.rank = 5; /* above max_rank 4 */
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_load_random(pool, 1, &ra));
  ra.rank = 2;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_load_random(pool, 3, &ra));  /* slot out of range */
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_load_random(pool, -1, &ra));
  ra.targets = 0;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_load_random(pool, 1, &ra));
  ra.targets = LMOE_TARGET_DOWN, ra.fused = 1;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_load_random(pool, 1, &ra));
  lmoe_adapter_desc d;
  lmoe_adapter_desc_init(&d);
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_load(pool, 1, &d)); /* no part */
  float a[E * 2 * H], bb[E * 2 * I];
  memset(a, 0, sizeof a), memset(bb, 0, sizeof bb);
  d.gate = (lmoe_lora_part){a, NULL, 2, 1.0f};
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_load(pool, 1, &d)); /* A without B */
  d.gate = (lmoe_lora_part){a, bb, 2, 1.0f};
  d.gate_up = (lmoe_lora_part){a, bb, 1, 1.0f};
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_load(pool, 1, &d)); /* both forms */
  d.struct_size = 0;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_load(pool, 1, &d));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_load(pool, 1, NULL));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_unload(pool, 7));
}

static void test_batch_errors(void) {
  int tok[3] = {2, 3, 1}, sl[3] = {0, 1, -1}; /* slot 1 holds nothing */
  FAILS(ctx, LMOE_ERR_STATE, lmoe_batch_set(batch, pool, 3, tok, sl));
  sl[1] = 5; /* out of range */
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_batch_set(batch, pool, 3, tok, sl));
  sl[1] = -4;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_batch_set(batch, pool, 3, tok, sl));
  sl[1] = 0, tok[2] = -1;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_batch_set(batch, pool, 3, tok, sl));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_batch_set(batch, pool, -1, tok, sl));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_batch_set(batch, pool, 2, NULL, sl));
  CHECK(lmoe_batch_set(NULL, pool, 1, tok, sl) == LMOE_ERR_INVALID_ARGUMENT, "NULL batch");
  lmoe_batch_info bi;
  CHECK(lmoe_batch_get_info(NULL, &bi) == LMOE_ERR_INVALID_ARGUMENT, "info NULL");
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_batch_create(ctx, NULL));
}

static void test_forward_errors(void) {
  lmoe_forward_args a;
  good_args(&a);
  CHECK(lmoe_forward(NULL, &a, NULL) == LMOE_ERR_INVALID_ARGUMENT, "NULL context");
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, NULL, NULL));
  good_args(&a);
  a.struct_size = 8;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL));
  good_args(&a), a.layer = NULL;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL));
  good_args(&a), a.batch = NULL;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL));
  good_args(&a), a.x = NULL;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL));
  good_args(&a), a.out = NULL;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL));
  good_args(&a), a.x = logits; /* wrong dtype and shape */
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL));
  good_args(&a), a.out = ref; /* f64 is for the reference only */
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL));
  good_args(&a), a.out = x; /* in place */
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL));
  good_args(&a), a.router_logits = NULL;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL)); /* no routing */
  good_args(&a), a.topk_ids = ids, a.topk_weights = wts;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL)); /* both routings */
  good_args(&a), a.router_logits = NULL, a.topk_ids = wts, a.topk_weights = wts;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL)); /* ids must be i32 */
  good_args(&a), a.pool = NULL; /* batch uses slot 0 */
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL));
  /* expert id out of range: named with token and value, out left alone */
  int32_t bad[M * K];
  for (int i = 0; i < M * K; i++) bad[i] = i % E;
  bad[7] = E + 3;
  OK(ctx, lmoe_buffer_write(ids, 0, bad, LMOE_DTYPE_I32, M * K));
  good_args(&a), a.router_logits = NULL, a.topk_ids = ids, a.topk_weights = wts;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL));
  CHECK(strstr(lmoe_context_last_error(ctx), "token 3") && strstr(lmoe_context_last_error(ctx), "7"),
        "message names token and value: %s", lmoe_context_last_error(ctx));
  a.out = ref;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_reference_forward(ctx, &a));
  bad[7] = -1;
  OK(ctx, lmoe_buffer_write(ids, 0, bad, LMOE_DTYPE_I32, M * K));
  a.out = out;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL));
  /* the reference wants f32/f64 out */
  good_args(&a);
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_reference_forward(ctx, &a));
  /* batch too big for max_tokens: shapes follow M, so make buffers of M = 21 */
  lmoe_batch *big;
  OK(ctx, lmoe_batch_create(ctx, &big));
  int tok[1] = {MAXT + 1};
  OK(ctx, lmoe_batch_set(big, NULL, 1, tok, NULL));
  lmoe_buffer *bx = test_buffer(ctx, LMOE_DTYPE_BF16, MAXT + 1, H);
  lmoe_buffer *bl = test_buffer(ctx, LMOE_DTYPE_F32, MAXT + 1, E);
  lmoe_buffer *bo = test_buffer(ctx, LMOE_DTYPE_BF16, MAXT + 1, H);
  good_args(&a), a.batch = big, a.x = bx, a.router_logits = bl, a.out = bo;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL));
  lmoe_buffer_release(bx), lmoe_buffer_release(bl), lmoe_buffer_release(bo);
  lmoe_batch_release(big);
  /* a slot unloaded after the batch was built */
  lmoe_random_adapter ra;
  lmoe_random_adapter_init(&ra);
  ra.rank = 3;
  OK(ctx, lmoe_pool_load_random(pool, 2, &ra));
  int t2[2] = {5, 5}, s2[2] = {2, 0};
  OK(ctx, lmoe_batch_set(batch, pool, 2, t2, s2));
  OK(ctx, lmoe_pool_unload(pool, 2));
  good_args(&a);
  FAILS(ctx, LMOE_ERR_STATE, lmoe_forward(ctx, &a, NULL));
  a.out = ref;
  FAILS(ctx, LMOE_ERR_STATE, lmoe_reference_forward(ctx, &a));
  /* a pool of another layer */
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = E, lc.hidden = H, lc.intermediate = I, lc.top_k = K, lc.max_tokens = MAXT;
  lmoe_layer *other;
  OK(ctx, lmoe_layer_create(ctx, &lc, &other));
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  lmoe_pool *opool;
  OK(ctx, lmoe_pool_create(other, &pc, &opool));
  int t3[1] = {M};
  OK(ctx, lmoe_batch_set(batch, NULL, 1, t3, NULL));
  good_args(&a), a.pool = opool;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL));
  /* buffers of another context */
  lmoe_context *c2 = test_cpu_context(1, LMOE_GUARD_HOST);
  lmoe_buffer *fx = test_buffer(c2, LMOE_DTYPE_BF16, M, H);
  good_args(&a), a.x = fx;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_forward(ctx, &a, NULL));
  lmoe_buffer_release(fx);
  lmoe_context_release(c2);
  /* and a good call still works after all that */
  good_args(&a);
  OK(ctx, lmoe_forward(ctx, &a, NULL));
  /* parents released before children: children keep them alive */
  lmoe_layer_release(other);
  lmoe_pool_release(opool);
}

/* Release order: the last user of a parent frees it, whatever the order. */
static void test_release_order(void) {
  lmoe_context *c = test_cpu_context(2, LMOE_GUARD_HOST);
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = E, lc.hidden = H, lc.intermediate = I, lc.top_k = K, lc.max_tokens = MAXT;
  lmoe_layer *l;
  OK(c, lmoe_layer_create(c, &lc, &l));
  OK(c, lmoe_layer_randomize(l, 9, 0.1f));
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  lmoe_pool *p;
  OK(c, lmoe_pool_create(l, &pc, &p));
  lmoe_random_adapter ra;
  lmoe_random_adapter_init(&ra);
  OK(c, lmoe_pool_load_random(p, 0, &ra));
  lmoe_batch *b;
  OK(c, lmoe_batch_create(c, &b));
  int tok[1] = {M}, sl[1] = {0};
  OK(c, lmoe_batch_set(b, p, 1, tok, sl));
  lmoe_buffer *bx = test_buffer(c, LMOE_DTYPE_BF16, M, H), *bl = test_buffer(c, LMOE_DTYPE_F32, M, E);
  lmoe_buffer *bo = test_buffer(c, LMOE_DTYPE_BF16, M, H);
  OK(c, lmoe_buffer_fill_random(bx, 1, -1, 1, NULL));
  OK(c, lmoe_buffer_fill_random(bl, 2, -1, 1, NULL));
  lmoe_context_release(c); /* parents first */
  lmoe_layer_release(l);
  lmoe_forward_args a;
  lmoe_forward_args_init(&a);
  a.layer = l, a.pool = p, a.batch = b, a.x = bx, a.router_logits = bl, a.out = bo;
  CHECK(lmoe_forward(c, &a, NULL) == LMOE_OK, "forward after the parents' release: %s",
        lmoe_context_last_error(c));
  lmoe_pool_release(p);
  lmoe_batch_release(b);
  lmoe_buffer_release(bx), lmoe_buffer_release(bl), lmoe_buffer_release(bo);
}

int main(void) {
  setup();
  test_context_errors();
  test_buffer_errors();
  test_layer_pool_errors();
  test_batch_errors();
  test_forward_errors();
  test_release_order();
  lmoe_buffer_release(x), lmoe_buffer_release(logits), lmoe_buffer_release(ids);
  lmoe_buffer_release(wts), lmoe_buffer_release(out), lmoe_buffer_release(ref);
  lmoe_batch_release(batch);
  lmoe_pool_release(pool);
  lmoe_layer_release(layer);
  lmoe_context_release(ctx);
  return test_summary();
}
