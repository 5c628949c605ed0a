/* The adapter pool's life cycle: load by name into free slots, reload in place,
   LRU eviction (recency from loads, touches, batches and forwards), pins, unload,
   memory figures; and forwards run between reloads and evictions each compute with
   the adapter that was in the slot when they ran. */
#include "formats_util.h"

#include <sys/stat.h>

enum { E = 4, H = 32, I = 16, K = 2 };

/* A random adapter as arrays (f32, PEFT layout per expert) and its float64 deltas. */
typedef struct test_adapter {
  float *a[3], *b[3];
  int rank[3];
  float scale[3];
  lmoe_adapter_desc desc;
  host_delta delta;
} test_adapter;

static void adapter_make(test_adapter *t, int targets, int max_rank) {
  memset(t, 0, sizeof *t);
  lmoe_adapter_desc_init(&t->desc);
  t->desc.dtype = LMOE_DTYPE_F32;
  t->delta = delta_new(E, H, I);
  lmoe_lora_part *parts[3] = {&t->desc.gate, &t->desc.up, &t->desc.down};
  for (int p = 0; p < 3; p++) {
    if (!(targets & (1 << p))) continue;
    int r = t->rank[p] = test_randint(1, max_rank), in = p == 2 ? I : H, out = p == 2 ? H : I;
    t->scale[p] = test_randf(0.5f, 2.0f);
    t->a[p] = malloc((size_t)E * r * in * sizeof(float));
    t->b[p] = malloc((size_t)E * out * r * sizeof(float));
    for (long i = 0; i < (long)E * r * in; i++) t->a[p][i] = test_randf(-0.3f, 0.3f);
    for (long i = 0; i < (long)E * out * r; i++) t->b[p][i] = test_randf(-0.3f, 0.3f);
    *parts[p] = (lmoe_lora_part){t->a[p], t->b[p], r, t->scale[p]};
    for (int e = 0; e < E; e++) {
      const float *A = t->a[p] + (long)e * r * in, *B = t->b[p] + (long)e * out * r;
      if (p == 2) add_ba(t->delta.d2 + (long)e * H * I, H, I, r, t->scale[p], A, in, 1, B, r, 1);
      else add_ba(t->delta.d13 + ((long)e * 2 * I + p * I) * H, I, H, r, t->scale[p], A, in, 1, B, r, 1);
    }
  }
}

static void adapter_free(test_adapter *t) {
  for (int p = 0; p < 3; p++) {
    free(t->a[p]);
    free(t->b[p]);
  }
  delta_free(&t->delta);
}

static void test_names_lru_pins(lmoe_context *ctx, lmoe_layer *layer) {
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = 3;
  pc.max_rank = 8;
  lmoe_pool *pool;
  OK(ctx, lmoe_pool_create(layer, &pc, &pool));
  test_adapter ad[5];
  for (int i = 0; i < 5; i++) adapter_make(&ad[i], test_randint(1, 7), 8);
  int32_t s[5] = {-1, -1, -1, -1, -1};
  OK(ctx, lmoe_pool_load_named(pool, "a", &ad[0].desc, &s[0]));
  OK(ctx, lmoe_pool_load_named(pool, "b", &ad[1].desc, &s[1]));
  OK(ctx, lmoe_pool_load_named(pool, "c", &ad[2].desc, &s[2]));
  CHECK(s[0] == 0 && s[1] == 1 && s[2] == 2, "free slots in order: %d %d %d", s[0], s[1], s[2]);
  int32_t f = -1;
  OK(ctx, lmoe_pool_find(pool, "b", &f));
  CHECK(f == 1 && !strcmp(lmoe_pool_slot_name(pool, 1), "b"), "find b -> %d", f);
  CHECK(lmoe_pool_find(pool, "zzz", &f) == LMOE_ERR_NOT_FOUND, "find absent");

  lmoe_pool_memory mem;
  OK(ctx, lmoe_pool_get_memory(pool, &mem));
  int64_t used = 0;
  for (int i = 0; i < 3; i++)
    used += 2LL * E * ((int64_t)(ad[i].rank[0] + ad[i].rank[1]) * (H + 2 * I) + (int64_t)ad[i].rank[2] * (I + H));
  CHECK(mem.num_slots == 3 && mem.loaded_slots == 3 && mem.total_bytes == 3 * mem.slot_bytes &&
            mem.loaded_bytes == 3 * mem.slot_bytes && mem.used_bytes == used && mem.evictions == 0,
        "memory: slots %d loaded %d used %lld (want %lld)", mem.num_slots, mem.loaded_slots,
        (long long)mem.used_bytes, (long long)used);
  lmoe_slot_info si;
  OK(ctx, lmoe_pool_slot_info(pool, 0, &si));
  CHECK(si.bytes == mem.slot_bytes, "slot info bytes");

  /* "a" was loaded first: it is the least recently used, unless something uses it. */
  OK(ctx, lmoe_pool_touch(pool, 0));
  OK(ctx, lmoe_pool_load_named(pool, "d", &ad[3].desc, &s[3]));
  CHECK(s[3] == 1 && lmoe_pool_find(pool, "b", NULL) == LMOE_ERR_NOT_FOUND, "d evicts b (LRU), got slot %d", s[3]);
  /* A batch that uses slot 2 ("c") makes it recent: the next eviction takes "a". */
  lmoe_batch *batch;
  OK(ctx, lmoe_batch_create(ctx, &batch));
  int32_t tok[1] = {3}, sl[1] = {2};
  OK(ctx, lmoe_batch_set(batch, pool, 1, tok, sl));
  OK(ctx, lmoe_pool_touch(pool, 1));
  OK(ctx, lmoe_pool_load_named(pool, "e", &ad[4].desc, &s[4]));
  CHECK(s[4] == 0 && lmoe_pool_find(pool, "a", NULL) == LMOE_ERR_NOT_FOUND, "e evicts a, got slot %d", s[4]);
  OK(ctx, lmoe_pool_get_memory(pool, &mem));
  CHECK(mem.evictions == 2, "two evictions, got %lld", (long long)mem.evictions);

  /* Reload in place: same name, same slot, new weights, generation bumps. */
  lmoe_slot_info before, after;
  OK(ctx, lmoe_pool_slot_info(pool, s[3], &before));
  int32_t again = -1;
  OK(ctx, lmoe_pool_load_named(pool, "d", &ad[1].desc, &again));
  OK(ctx, lmoe_pool_slot_info(pool, s[3], &after));
  CHECK(again == s[3] && after.generation == before.generation + 1 && after.rank_gate == ad[1].rank[0] &&
            after.rank_down == ad[1].rank[2],
        "reload in place: slot %d gen %llu -> %llu", again, (unsigned long long)before.generation,
        (unsigned long long)after.generation);

  /* Pins: pinned slots are never evicted; all pinned -> FULL; pins nest. */
  for (int i = 0; i < 3; i++) OK(ctx, lmoe_pool_pin(pool, i));
  OK(ctx, lmoe_pool_pin(pool, 0));
  CHECK(lmoe_pool_pin_count(pool, 0) == 2, "pins nest");
  FAILS(ctx, LMOE_ERR_FULL, lmoe_pool_load_named(pool, "f", &ad[0].desc, NULL));
  CHECK(strstr(lmoe_context_last_error(ctx), "pinned"), "FULL says why: %s", lmoe_context_last_error(ctx));
  OK(ctx, lmoe_pool_unpin(pool, 2));
  OK(ctx, lmoe_pool_touch(pool, 2)); /* most recent, but the only unpinned one */
  OK(ctx, lmoe_pool_load_named(pool, "f", &ad[0].desc, &f));
  CHECK(f == 2 && lmoe_pool_find(pool, "c", NULL) == LMOE_ERR_NOT_FOUND, "f evicts the one unpinned slot: %d", f);
  OK(ctx, lmoe_pool_unpin(pool, 0));
  OK(ctx, lmoe_pool_unpin(pool, 0));
  FAILS(ctx, LMOE_ERR_STATE, lmoe_pool_unpin(pool, 0));
  OK(ctx, lmoe_pool_unpin(pool, 1));

  /* Unload by name frees the slot; the next load takes it without evicting. */
  OK(ctx, lmoe_pool_unload_named(pool, "d"));
  FAILS(ctx, LMOE_ERR_NOT_FOUND, lmoe_pool_unload_named(pool, "d"));
  OK(ctx, lmoe_pool_load_named(pool, "g", &ad[2].desc, &f));
  OK(ctx, lmoe_pool_get_memory(pool, &mem));
  CHECK(f == s[3] && mem.evictions == 3, "g takes the freed slot %d (evictions %lld)", f, (long long)mem.evictions);

  /* A refused adapter leaves the slot it would have taken as it was. */
  lmoe_adapter_desc bad = ad[3].desc;
  bad.dtype = 99;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_load_named(pool, "g", &bad, NULL));
  OK(ctx, lmoe_pool_find(pool, "g", &f));
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_load_named(pool, "", &ad[0].desc, NULL));
  char longname[200];
  memset(longname, 'x', sizeof longname - 1);
  longname[sizeof longname - 1] = 0;
  FAILS(ctx, LMOE_ERR_INVALID_ARGUMENT, lmoe_pool_load_named(pool, longname, &ad[0].desc, NULL));

  lmoe_batch_release(batch);
  for (int i = 0; i < 5; i++) adapter_free(&ad[i]);
  lmoe_pool_release(pool);
}

/* Forward, reload the slot, forward, evict it for another adapter, forward: each
   result matches the adapter that was in the slot when that forward ran. */
static void test_reload_between_forwards(lmoe_context *ctx, lmoe_layer *layer) {
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = 2;
  pc.max_rank = 8;
  lmoe_pool *pool;
  OK(ctx, lmoe_pool_create(layer, &pc, &pool));
  test_adapter A, B, C, D;
  adapter_make(&A, 7, 8);
  adapter_make(&B, 7, 8);
  adapter_make(&C, 5, 8);
  adapter_make(&D, 2, 8);
  int M = 12;
  lmoe_buffer *x = test_buffer(ctx, LMOE_DTYPE_BF16, M, H), *ids = test_buffer(ctx, LMOE_DTYPE_I32, M, K),
              *w = test_buffer(ctx, LMOE_DTYPE_F32, M, K);
  OK(ctx, lmoe_buffer_fill_random(x, test_rand(), -1.0f, 1.0f, NULL));
  int32_t hid[12 * K];
  float hw[12 * K];
  random_routing(M, E, K, hid, hw);
  OK(ctx, lmoe_buffer_write(ids, 0, hid, LMOE_DTYPE_I32, M * K));
  OK(ctx, lmoe_buffer_write(w, 0, hw, LMOE_DTYPE_F32, M * K));
  double hx[12 * H], want[12 * H], *W13, *W2;
  OK(ctx, lmoe_buffer_read(x, 0, hx, LMOE_DTYPE_F64, M * H));
  layer_weights_f64(ctx, layer, &W13, &W2);

  int32_t sa, sd;
  OK(ctx, lmoe_pool_load_named(pool, "x", &A.desc, &sa));
  OK(ctx, lmoe_pool_load_named(pool, "other", &D.desc, &sd));
  lmoe_batch *batch;
  OK(ctx, lmoe_batch_create(ctx, &batch));
  int32_t tok[3] = {5, 3, 4}, sl[3] = {sa, LMOE_NO_ADAPTER, sd};
  OK(ctx, lmoe_batch_set(batch, pool, 3, tok, sl));
  const host_delta *per[12];
  const test_adapter *in_slot_a[3] = {&A, &B, &C};
  for (int step = 0; step < 3; step++) {
    for (int t = 0; t < M; t++) per[t] = t < 5 ? &in_slot_a[step]->delta : t < 8 ? NULL : &D.delta;
    own_forward(M, E, H, I, K, hx, hid, hw, W13, W2, per, want);
    char what[64];
    snprintf(what, sizeof what, "forward after step %d", step);
    check_forward(ctx, layer, pool, batch, x, ids, w, want, M, H, what);
    if (step == 0) {
      int32_t s2;
      OK(ctx, lmoe_pool_load_named(pool, "x", &B.desc, &s2)); /* reload in place */
      CHECK(s2 == sa, "reload keeps slot");
    } else if (step == 1) {
      /* "other" was used by the last forward as much as "x"; touch it so "x" is the
         LRU one and gets evicted for "y", which lands in x's slot */
      OK(ctx, lmoe_pool_touch(pool, sd));
      int32_t s3;
      OK(ctx, lmoe_pool_load_named(pool, "y", &C.desc, &s3));
      CHECK(s3 == sa && lmoe_pool_find(pool, "x", NULL) == LMOE_ERR_NOT_FOUND, "y evicted x: slot %d", s3);
    }
  }
  /* The batch still names slot sa; unloading it makes the forward refuse, not guess. */
  OK(ctx, lmoe_pool_unload_named(pool, "y"));
  lmoe_buffer *out = test_buffer(ctx, LMOE_DTYPE_BF16, M, H);
  lmoe_forward_args a;
  lmoe_forward_args_init(&a);
  a.layer = layer, a.pool = pool, a.batch = batch, a.x = x, a.topk_ids = ids, a.topk_weights = w, a.out = out;
  FAILS(ctx, LMOE_ERR_STATE, lmoe_forward(ctx, &a, NULL));
  lmoe_buffer_release(out);
  lmoe_batch_release(batch);
  lmoe_buffer_release(x);
  lmoe_buffer_release(ids);
  lmoe_buffer_release(w);
  free(W13);
  free(W2);
  adapter_free(&A);
  adapter_free(&B);
  adapter_free(&C);
  adapter_free(&D);
  lmoe_pool_release(pool);
}

int main(int argc, char **argv) {
  (void)argc, (void)argv;
  test_seed("test_pool_life");
  lmoe_context *ctx = test_cpu_context(2, LMOE_GUARD_HOST);
  lmoe_layer *layer = test_layer(ctx, E, H, I, K, 64, 0.2f);
  test_names_lru_pins(ctx, layer);
  test_reload_between_forwards(ctx, layer);
  lmoe_layer_release(layer);
  lmoe_context_release(ctx);
  return test_summary();
}
