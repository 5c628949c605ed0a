/* Two contexts used from two threads at once give the same results as one alone:
   no globals are shared between contexts (each has its own worker pool). */
#include "test_util.h"

#include <pthread.h>

typedef struct job {
  uint64_t seed;
  int threads;
  uint16_t *out; /* M x H bf16 */
  int ok;
} job;

enum { E = 8, H = 96, I = 64, K = 2, M = 300 };

static void *run(void *v) {
  job *j = v;
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.backend = LMOE_BACKEND_CPU;
  cfg.threads = j->threads;
  lmoe_context *ctx = NULL;
  if (lmoe_context_create(&cfg, &ctx, NULL, 0)) return NULL;
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = E, lc.hidden = H, lc.intermediate = I, lc.top_k = K, lc.max_tokens = M;
  lmoe_layer *layer = NULL;
  lmoe_pool *pool = NULL;
  lmoe_batch *batch = NULL;
  lmoe_buffer *x = NULL, *lg = NULL, *out = NULL;
  int64_t sx[2] = {M, H}, sl[2] = {M, E};
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  lmoe_random_adapter ra;
  lmoe_random_adapter_init(&ra);
  ra.seed = j->seed;
  int tok[3] = {100, 120, 80}, slots[3] = {0, -1, 1};
  lmoe_forward_args a;
  lmoe_forward_args_init(&a);
  int st = lmoe_layer_create(ctx, &lc, &layer) || lmoe_layer_randomize(layer, j->seed, 0.1f) ||
           lmoe_pool_create(layer, &pc, &pool) || lmoe_pool_load_random(pool, 0, &ra) ||
           (ra.seed++, ra.rank = 7, lmoe_pool_load_random(pool, 1, &ra)) ||
           lmoe_batch_create(ctx, &batch) || lmoe_batch_set(batch, pool, 3, tok, slots) ||
           lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &x) ||
           lmoe_buffer_create(ctx, LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE, 2, sl, &lg) ||
           lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &out) ||
           lmoe_buffer_fill_random(x, j->seed + 1, -1, 1, NULL) ||
           lmoe_buffer_fill_random(lg, j->seed + 2, -1, 1, NULL);
  if (!st) {
    a.layer = layer, a.pool = pool, a.batch = batch, a.x = x, a.router_logits = lg, a.out = out;
    for (int rep = 0; rep < 20 && !st; rep++) st = lmoe_forward(ctx, &a, NULL);
    if (!st) st = lmoe_buffer_read(out, 0, j->out, LMOE_DTYPE_BF16, (int64_t)M * H);
  }
  j->ok = !st;
  lmoe_buffer_release(x), lmoe_buffer_release(lg), lmoe_buffer_release(out);
  lmoe_batch_release(batch);
  lmoe_pool_release(pool);
  lmoe_layer_release(layer);
  lmoe_context_release(ctx);
  return NULL;
}

int main(void) {
  test_seed("test_threads");
  uint64_t seed = test_rand();
  job alone = {seed, 2, malloc(sizeof(uint16_t) * M * H), 0};
  job other_alone = {seed + 99, 1, malloc(sizeof(uint16_t) * M * H), 0};
  run(&alone);
  run(&other_alone);
  CHECK(alone.ok && other_alone.ok, "single runs failed");
  job a = {seed, 2, malloc(sizeof(uint16_t) * M * H), 0};
  job b = {seed + 99, 3, malloc(sizeof(uint16_t) * M * H), 0};
  pthread_t ta, tb;
  CHECK(pthread_create(&ta, NULL, run, &a) == 0 && pthread_create(&tb, NULL, run, &b) == 0, "threads");
  pthread_join(ta, NULL);
  pthread_join(tb, NULL);
  CHECK(a.ok && b.ok, "concurrent runs failed");
  CHECK(memcmp(a.out, alone.out, sizeof(uint16_t) * M * H) == 0, "context A differs when run concurrently");
  CHECK(memcmp(b.out, other_alone.out, sizeof(uint16_t) * M * H) == 0,
        "context B differs when run concurrently (and with another thread count)");
  CHECK(memcmp(a.out, b.out, sizeof(uint16_t) * M * H) != 0, "different seeds gave the same output");
  free(alone.out), free(other_alone.out), free(a.out), free(b.out);
  return test_summary();
}
