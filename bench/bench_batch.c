/* Host cost of lmoe_batch_set: 256 requests with random token counts, about half on
   one of 16 adapter slots. Median over many repetitions, in microseconds. */
#include "bench_common.h"
#include "loramoe.h"

#include <stdio.h>
#include <string.h>

#define DIE(what, st) \
  do { fprintf(stderr, "%s: %s\n", what, lmoe_status_string(st)); return 1; } while (0)

int main(int argc, char **argv) {
  int reps = argc > 1 ? atoi(argv[1]) : 5000;
  enum { NREQ = 256, SLOTS = 16 };
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.backend = LMOE_BACKEND_CPU;
  lmoe_context *ctx;
  lmoe_status st = lmoe_context_create(&cfg, &ctx, NULL, 0);
  if (st) DIE("context", st);
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = 4, lc.hidden = 64, lc.intermediate = 32, lc.max_tokens = 1 << 20;
  lmoe_layer *layer;
  if ((st = lmoe_layer_create(ctx, &lc, &layer))) DIE("layer", st);
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = SLOTS, pc.max_rank = 16;
  lmoe_pool *pool;
  if ((st = lmoe_pool_create(layer, &pc, &pool))) DIE("pool", st);
  for (int s = 0; s < SLOTS; s++) {
    lmoe_random_adapter ra;
    lmoe_random_adapter_init(&ra);
    ra.rank = 4 << (s % 3);
    ra.seed = (uint64_t)s;
    if ((st = lmoe_pool_load_random(pool, s, &ra))) DIE("adapter", st);
  }
  lmoe_batch *b;
  if ((st = lmoe_batch_create(ctx, &b))) DIE("batch", st);
  int32_t tok[NREQ], sl[NREQ];
  srand(7);
  for (int i = 0; i < NREQ; i++) {
    tok[i] = 1 + rand() % 512;
    sl[i] = rand() % 2 ? rand() % SLOTS : LMOE_NO_ADAPTER;
  }
  double *t = malloc(sizeof(double) * (size_t)reps);
  for (int pass = 0; pass < 2; pass++) {
    lmoe_pool *p = pass ? NULL : pool;
    for (int i = 0; i < 100; i++) lmoe_batch_set(b, p, NREQ, tok, sl); /* warm-up */
    for (int r = 0; r < reps; r++) {
      double t0 = now_s();
      st = lmoe_batch_set(b, p, NREQ, tok, sl);
      t[r] = now_s() - t0;
      if (st) DIE("batch_set", st);
    }
    double med = median(t, reps); /* sorts t */
    printf("lmoe_batch_set, %d requests, %s: median %.2f us, min %.2f us (%d reps)\n", NREQ,
           pass ? "no pool" : "with pool (16 slots)", 1e6 * med, 1e6 * t[0], reps);
  }
  free(t);
  lmoe_batch_release(b);
  lmoe_pool_release(pool);
  lmoe_layer_release(layer);
  lmoe_context_release(ctx);
  return 0;
}
