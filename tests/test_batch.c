/* Batch facts: offsets, sorted active slots, tokens per slot, has_active, max_rank
   with and without a pool; a failed set leaves the batch as it was. */
#include "test_util.h"

static void check_facts(lmoe_batch *b, const lmoe_pool *pool, int n, const int *tok, const int *sl,
                        const int *rank_of_slot) {
  lmoe_batch_info bi;
  CHECK(lmoe_batch_get_info(b, &bi) == LMOE_OK, "info");
  int64_t off[70];
  int32_t got = lmoe_batch_offsets(b, off, 70);
  CHECK(got == n + 1, "offsets count %d want %d", got, n + 1);
  int64_t sum = 0;
  int64_t per_slot[16] = {0};
  int want_rank = 0, max_slot = -1;
  for (int i = 0; i < n; i++) {
    CHECK(off[i] == sum, "offset %d is %lld want %lld", i, (long long)off[i], (long long)sum);
    sum += tok[i];
    if (sl && sl[i] >= 0 && tok[i] > 0) {
      per_slot[sl[i]] += tok[i];
      if (pool && rank_of_slot[sl[i]] > want_rank) want_rank = rank_of_slot[sl[i]];
      if (sl[i] > max_slot) max_slot = sl[i];
    }
  }
  CHECK(off[n] == sum && bi.num_tokens == sum, "total %lld", (long long)sum);
  CHECK(bi.num_requests == n, "num_requests");
  int32_t slots[16];
  int64_t ntok[16];
  int32_t na = lmoe_batch_active_slots(b, slots, ntok, 16);
  int want_na = 0;
  for (int s = 0; s < 16; s++) {
    if (!per_slot[s]) continue;
    CHECK(want_na < na && slots[want_na] == s && ntok[want_na] == per_slot[s],
          "active #%d: want slot %d with %lld tokens", want_na, s, (long long)per_slot[s]);
    want_na++;
  }
  CHECK(na == want_na && bi.num_active == want_na && bi.has_active == (want_na > 0),
        "num_active %d want %d", na, want_na);
  CHECK(bi.max_rank == want_rank, "max_rank %d want %d", bi.max_rank, want_rank);
  CHECK(bi.max_slot == max_slot, "max_slot %d want %d", bi.max_slot, max_slot);
}

int main(void) {
  test_seed("test_batch");
  lmoe_context *ctx = test_cpu_context(1, LMOE_GUARD_HOST);
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = 4, lc.hidden = 8, lc.intermediate = 8, lc.max_tokens = 64;
  lmoe_layer *layer;
  OK(ctx, lmoe_layer_create(ctx, &lc, &layer));
  lmoe_pool_config pc;
  lmoe_pool_config_init(&pc);
  pc.num_slots = 16, pc.max_rank = 32;
  lmoe_pool *pool;
  OK(ctx, lmoe_pool_create(layer, &pc, &pool));
  int rank_of_slot[16] = {0};
  for (int s = 0; s < 16; s++) {
    if (s % 5 == 4) continue; /* some slots stay empty */
    lmoe_random_adapter ra;
    lmoe_random_adapter_init(&ra);
    ra.rank = test_randint(1, 32);
    ra.targets = test_randint(1, 7);
    OK(ctx, lmoe_pool_load_random(pool, s, &ra));
    rank_of_slot[s] = ra.rank;
  }
  lmoe_batch *b;
  OK(ctx, lmoe_batch_create(ctx, &b));
  lmoe_batch_info bi;
  OK(ctx, lmoe_batch_get_info(b, &bi));
  CHECK(bi.num_requests == 0 && bi.num_tokens == 0 && !bi.has_active && bi.max_slot == -1, "fresh batch");
  for (int round = 0; round < 200; round++) {
    int n = test_randint(0, 64), tok[64], sl[64];
    for (int i = 0; i < n; i++) {
      tok[i] = test_randint(0, 3) ? test_randint(0, 50) : 0;
      int s = test_randint(-1, 15);
      sl[i] = s >= 0 && rank_of_slot[s] ? s : -1;
    }
    bool with_pool = test_randint(0, 1);
    bool no_slots = test_randint(0, 7) == 0;
    OK(ctx, lmoe_batch_set(b, with_pool ? pool : NULL, n, tok, no_slots ? NULL : sl));
    check_facts(b, with_pool ? pool : NULL, n, tok, no_slots ? NULL : sl, rank_of_slot);
    /* a failing set (empty slot 4 / negative tokens) leaves everything as it was */
    int bad_tok[65], bad_sl[65];
    memcpy(bad_tok, tok, sizeof(int) * (size_t)n), memcpy(bad_sl, sl, sizeof(int) * (size_t)n);
    bad_tok[n] = 3, bad_sl[n] = test_randint(0, 1) ? 4 : 0;
    if (bad_sl[n] == 0) bad_tok[n] = -2;
    lmoe_status st = lmoe_batch_set(b, pool, n + 1, bad_tok, bad_sl);
    CHECK(st != LMOE_OK, "bad set accepted");
    check_facts(b, with_pool ? pool : NULL, n, tok, no_slots ? NULL : sl, rank_of_slot);
  }
  lmoe_batch_release(b);
  lmoe_pool_release(pool);
  lmoe_layer_release(layer);
  lmoe_context_release(ctx);
  return test_summary();
}
