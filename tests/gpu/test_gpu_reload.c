/* Reload and eviction while forwards are queued on the cuda backend: every forward must
   see the adapter that was in its slot when it was enqueued, never a half-written or
   later one. The stream is kept busy with forwards first so the ones under test are
   still queued when the slot is rewritten. */
#include "../test_util.h"

#ifdef LMOE_SIM_CUDA
/* the simulated device (tests/sim) is slow by construction: small shapes keep it busy */
enum { E = 8, H = 128, I = 64, K = 2, M = 256, BUSY = 4 };
#else
enum { E = 16, H = 512, I = 256, K = 4, M = 2048, BUSY = 30 };
#endif

static lmoe_context *ctx;
static lmoe_layer *layer;
static lmoe_pool *pool;
static lmoe_batch *batch;
static lmoe_buffer *x, *logits, *busy_out;

/* Random f32 adapter in PEFT layout (gate, up, down, rank r), values from `seed`. */
typedef struct adapter {
  float *a[3], *b[3];
  lmoe_adapter_desc d;
} adapter;

static void adapter_make(adapter *ad, int r) {
  int in[3] = {H, H, I}, out[3] = {I, I, H};
  lmoe_adapter_desc_init(&ad->d);
  ad->d.dtype = LMOE_DTYPE_F32;
  lmoe_lora_part *parts[3] = {&ad->d.gate, &ad->d.up, &ad->d.down};
  for (int p = 0; p < 3; p++) {
    size_t na = (size_t)E * r * in[p], nb = (size_t)E * out[p] * r;
    ad->a[p] = malloc(na * sizeof(float));
    ad->b[p] = malloc(nb * sizeof(float));
    for (size_t i = 0; i < na; i++) ad->a[p][i] = test_randf(-1.0f, 1.0f) / sqrtf((float)in[p]);
    for (size_t i = 0; i < nb; i++) ad->b[p][i] = test_randf(-1.0f, 1.0f) * 0.05f;
    parts[p]->a = ad->a[p];
    parts[p]->b = ad->b[p];
    parts[p]->rank = r;
    parts[p]->scale = lmoe_lora_scale(2.0f * (float)r, r, 0);
  }
}

static void adapter_free(adapter *ad) {
  for (int p = 0; p < 3; p++) free(ad->a[p]), free(ad->b[p]);
}

static void forward_into(lmoe_buffer *out) {
  lmoe_forward_args a;
  lmoe_forward_args_init(&a);
  a.layer = layer;
  a.pool = pool;
  a.batch = batch;
  a.x = x;
  a.router_logits = logits;
  a.out = out;
  OK(ctx, lmoe_forward(ctx, &a, NULL));
}

/* Every request on `slot`. */
static void batch_on(int slot) {
  int32_t tok[4] = {M / 4, M / 4, M / 4, M - 3 * (M / 4)};
  int32_t sl[4] = {slot, slot, slot, slot};
  OK(ctx, lmoe_batch_set(batch, pool, 4, tok, sl));
}

static uint16_t *read_out(lmoe_buffer *out) {
  uint16_t *h = malloc((size_t)M * H * 2);
  OK(ctx, lmoe_buffer_read(out, 0, h, LMOE_DTYPE_BF16, (int64_t)M * H));
  return h;
}

/* The output of a lone forward (nothing queued around it), checked once against the
   float64 reference: the expectation for the queued runs, which must match it bit for
   bit (the kernels are deterministic). */
static uint16_t *expected(lmoe_buffer *out) {
  forward_into(out);
  uint16_t *h = read_out(out);
  int64_t shape[2] = {M, H};
  lmoe_buffer *ref = NULL;
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_F32, LMOE_MEMORY_HOST, 2, shape, &ref));
  lmoe_forward_args a;
  lmoe_forward_args_init(&a);
  a.layer = layer, a.pool = pool, a.batch = batch, a.x = x, a.router_logits = logits, a.out = ref;
  OK(ctx, lmoe_reference_forward(ctx, &a));
  lmoe_compare_result c;
  OK(ctx, lmoe_buffer_compare(out, ref, &c));
  CHECK(c.nonfinite == 0 && c.rel_l2 < 1e-2, "lone forward vs reference: rel_l2 %g", c.rel_l2);
  lmoe_buffer_release(ref);
  return h;
}

static void busy(void) {
  for (int i = 0; i < BUSY; i++) forward_into(busy_out);
}

static int differs(const uint16_t *a, const uint16_t *b) { return memcmp(a, b, (size_t)M * H * 2) != 0; }

int main(void) {
  if (!test_need_gpu("test_gpu_reload")) return 1;
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.backend = LMOE_BACKEND_CUDA;
  char err[256];
  if (lmoe_context_create(&cfg, &ctx, err, sizeof err)) {
    fprintf(stderr, "cuda context: %s\n", err);
    return 1;
  }
  layer = test_layer(ctx, E, H, I, K, M, 0.05f);
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = 2, pc.max_rank = 16;
  OK(ctx, lmoe_pool_create(layer, &pc, &pool));
  OK(ctx, lmoe_batch_create(ctx, &batch));
  int64_t sx[2] = {M, H}, sl[2] = {M, E};
  lmoe_buffer *outs[4];
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &x));
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE, 2, sl, &logits));
  OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &busy_out));
  for (int i = 0; i < 4; i++) OK(ctx, lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &outs[i]));
  OK(ctx, lmoe_buffer_fill_random(x, test_rand(), -1.0f, 1.0f, NULL));
  OK(ctx, lmoe_buffer_fill_random(logits, test_rand(), -2.0f, 2.0f, NULL));

  adapter X, Y, Z;
  adapter_make(&X, 16);
  adapter_make(&Y, 8);
  adapter_make(&Z, 12);

  /* Expectations, one adapter at a time in slot 0. */
  int32_t slot = -1;
  OK(ctx, lmoe_pool_load_named(pool, "X", &X.d, &slot));
  CHECK(slot == 0, "X went to slot %d, expected the first free one", (int)slot);
  batch_on(0);
  uint16_t *ex = expected(outs[0]);
  OK(ctx, lmoe_pool_load_named(pool, "X", &Y.d, &slot)); /* reload in place */
  CHECK(slot == 0, "reload of X went to slot %d", (int)slot);
  uint16_t *ey = expected(outs[0]);
  OK(ctx, lmoe_pool_load_named(pool, "X", &Z.d, &slot));
  uint16_t *ez = expected(outs[0]);
  CHECK(differs(ex, ey) && differs(ey, ez), "the adapters do not change the output");

  /* 1. Reload in place while forwards are queued: A with X, then Y over it, B with Y. */
  OK(ctx, lmoe_pool_load_named(pool, "X", &X.d, &slot));
  batch_on(0);
  busy();
  forward_into(outs[1]);
  OK(ctx, lmoe_pool_load_named(pool, "X", &Y.d, &slot));
  forward_into(outs[2]);
  OK(ctx, lmoe_context_synchronize(ctx, NULL));
  uint16_t *a = read_out(outs[1]), *b = read_out(outs[2]);
  CHECK(!differs(a, ex), "a forward queued before a reload saw other weights than the old adapter's");
  CHECK(!differs(b, ey), "a forward queued after a reload did not see the new adapter");
  free(a), free(b);

  /* 2. Eviction while queued: slot 0 holds "X" (= X), slot 1 "W"; a forward on slot 0
     is queued, then loading a third name evicts the least recently used slot — make
     it slot 0 by touching slot 1 — and a forward on the new adapter follows. */
  OK(ctx, lmoe_pool_load_named(pool, "X", &X.d, &slot));
  OK(ctx, lmoe_pool_load_named(pool, "W", &Y.d, &slot));
  CHECK(slot == 1, "W went to slot %d", (int)slot);
  batch_on(0);
  busy();
  forward_into(outs[1]);
  OK(ctx, lmoe_pool_touch(pool, 1)); /* forwards mark slot 0 used; make slot 1 newer */
  OK(ctx, lmoe_pool_load_named(pool, "Z", &Z.d, &slot));
  CHECK(slot == 0, "Z evicted slot %d, expected the least recently used (0)", (int)slot);
  int32_t found = -1;
  CHECK(lmoe_pool_find(pool, "X", &found) == LMOE_ERR_NOT_FOUND, "X is still found after eviction");
  batch_on(0);
  forward_into(outs[2]);
  OK(ctx, lmoe_context_synchronize(ctx, NULL));
  a = read_out(outs[1]), b = read_out(outs[2]);
  CHECK(!differs(a, ex), "a forward queued before an eviction saw other weights than the evicted adapter's");
  CHECK(!differs(b, ez), "a forward queued after an eviction did not see the new adapter");
  free(a), free(b);

  /* 3. Unload while queued: the queued forward still computes with the adapter; a new
     forward on the emptied slot is refused with a message. */
  batch_on(0);
  busy();
  forward_into(outs[3]);
  OK(ctx, lmoe_pool_unload(pool, 0));
  lmoe_forward_args fa;
  lmoe_forward_args_init(&fa);
  fa.layer = layer, fa.pool = pool, fa.batch = batch, fa.x = x, fa.router_logits = logits, fa.out = outs[2];
  lmoe_status st = lmoe_forward(ctx, &fa, NULL);
  CHECK(st == LMOE_ERR_STATE && strstr(lmoe_context_last_error(ctx), "holds no adapter"),
        "forward on an unloaded slot: status %d, message '%s'", (int)st, lmoe_context_last_error(ctx));
  a = read_out(outs[3]);
  CHECK(!differs(a, ez), "a forward queued before an unload lost its adapter");
  free(a);

  free(ex), free(ey), free(ez);
  adapter_free(&X), adapter_free(&Y), adapter_free(&Z);
  for (int i = 0; i < 4; i++) lmoe_buffer_release(outs[i]);
  lmoe_buffer_release(x);
  lmoe_buffer_release(logits);
  lmoe_buffer_release(busy_out);
  lmoe_batch_release(batch);
  lmoe_pool_release(pool);
  lmoe_layer_release(layer);
  lmoe_context_release(ctx);
  return test_summary();
}
