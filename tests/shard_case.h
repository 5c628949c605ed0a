/* What the sharding tests share: tests/test_shard.c (cpu backend, ranks on threads)
   and tests/gpu/test_gpu_shard.c (cuda backend, ranks on one device). A rank's state,
   the adapters of mixed ranks and forms, the layer's config for a shard, a rank's
   inputs and their release. The including file defines, before including it, the
   layer's sizes E, H, I, K, the batch's NREQ requests (req_tokens, req_slots), SLOTS
   and MAXR of the pool, and M (the batch's tokens). */
#ifndef LMOE_TEST_SHARD_CASE_H
#define LMOE_TEST_SHARD_CASE_H

#include "test_util.h"

typedef struct rank_state {
  lmoe_context *ctx;
  lmoe_layer *layer;
  lmoe_pool *pool;
  lmoe_batch *batch;
  lmoe_buffer *x, *logits, *ids, *wts, *out;
  lmoe_forward_args args;
  lmoe_status st;
} rank_state;

/* Adapters of mixed ranks and forms: separate gate/up/down, fused gate_up, gate only,
   down only; one request has none (req_slots). */
static void load_adapters(lmoe_context *c, lmoe_pool *p) {
  static const struct { int32_t targets, fused, rank; } a[SLOTS] = {
      {LMOE_TARGET_ALL, 0, 4}, {LMOE_TARGET_ALL, 1, 16}, {LMOE_TARGET_GATE, 0, 3}, {LMOE_TARGET_DOWN, 0, 8}};
  for (int32_t s = 0; s < SLOTS; s++) {
    lmoe_random_adapter ra;
    lmoe_random_adapter_init(&ra);
    ra.targets = a[s].targets, ra.fused = a[s].fused, ra.rank = a[s].rank;
    ra.alpha = 2.0f * (float)a[s].rank, ra.seed = 100 + (uint64_t)s, ra.scale = 0.2f;
    OK(c, lmoe_pool_load_random(p, s, &ra));
  }
}

static lmoe_layer_config layer_cfg(int32_t mode, int32_t rank, int32_t size, lmoe_comm *comm) {
  lmoe_layer_config lc;
  lmoe_layer_config_init(&lc);
  lc.num_experts = E, lc.hidden = H, lc.intermediate = I, lc.top_k = K, lc.max_tokens = 128;
  lc.shard_mode = mode, lc.shard_rank = rank, lc.shard_size = size, lc.comm = comm;
  return lc;
}

/* The same inputs on every context (a fill gives the same values for one seed on
   every backend): x, out, the routing (router logits, or given ids and weights), the
   batch (on r->pool when adapters, else none) and the forward's arguments. */
static void make_inputs(rank_state *r, bool adapters, bool given_routing) {
  lmoe_context *c = r->ctx;
  int64_t sx[2] = {M, H}, sl[2] = {M, E}, sk[2] = {M, K};
  OK(c, lmoe_buffer_create(c, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &r->x));
  OK(c, lmoe_buffer_create(c, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 2, sx, &r->out));
  OK(c, lmoe_buffer_fill_random(r->x, 11, -1.0f, 1.0f, NULL));
  lmoe_forward_args_init(&r->args);
  if (given_routing) {
    OK(c, lmoe_buffer_create(c, LMOE_DTYPE_I32, LMOE_MEMORY_DEVICE, 2, sk, &r->ids));
    OK(c, lmoe_buffer_create(c, LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE, 2, sk, &r->wts));
    int32_t *ids = malloc((size_t)(M * K) * sizeof *ids);
    for (int64_t t = 0; t < M; t++) {
      ids[t * K] = (int32_t)((t * 5 + 1) % E);
      ids[t * K + 1] = (int32_t)((t * 3 + 4 + (t % 2)) % E);
      if (ids[t * K + 1] == ids[t * K]) ids[t * K + 1] = (ids[t * K] + 1) % E;
    }
    OK(c, lmoe_buffer_write(r->ids, 0, ids, LMOE_DTYPE_I32, M * K));
    free(ids);
    OK(c, lmoe_buffer_fill_random(r->wts, 12, 0.1f, 0.9f, NULL));
    r->args.topk_ids = r->ids, r->args.topk_weights = r->wts;
  } else {
    OK(c, lmoe_buffer_create(c, LMOE_DTYPE_F32, LMOE_MEMORY_DEVICE, 2, sl, &r->logits));
    OK(c, lmoe_buffer_fill_random(r->logits, 13, -2.0f, 2.0f, NULL));
    r->args.router_logits = r->logits;
  }
  OK(c, lmoe_batch_create(c, &r->batch));
  OK(c, lmoe_batch_set(r->batch, adapters ? r->pool : NULL, NREQ, req_tokens, adapters ? req_slots : NULL));
  r->args.layer = r->layer;
  r->args.pool = adapters ? r->pool : NULL;
  r->args.batch = r->batch;
  r->args.x = r->x;
  r->args.out = r->out;
}

static void free_rank(rank_state *r) {
  lmoe_buffer_release(r->x), lmoe_buffer_release(r->out), lmoe_buffer_release(r->logits);
  lmoe_buffer_release(r->ids), lmoe_buffer_release(r->wts);
  lmoe_batch_release(r->batch);
  lmoe_pool_release(r->pool);
  lmoe_layer_release(r->layer);
  lmoe_context_release(r->ctx);
  memset(r, 0, sizeof *r);
}

#endif
