/* Batch: requests -> host metadata and the active-adapter facts. Host only. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>


static void batch_destroy(lmoe_object *obj) {
  lmoe_batch *b = (lmoe_batch *)obj;
  lmoe_context *ctx = b->ctx;
  if (ctx->ops->batch_fini) ctx->ops->batch_fini(ctx, b);
  free(b->offsets);
  free(b->req_slot);
  free(b->active_slots);
  free(b->active_tokens);
  free(b);
  lmoe_context_release(ctx);
}

lmoe_status lmoe_batch_create(lmoe_context *ctx, lmoe_batch **out) {
  if (!ctx || ctx->obj.magic != LMOE_MAGIC_CONTEXT) return LMOE_ERR_INVALID_ARGUMENT;
  if (!out) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "out is NULL");
  lmoe_batch *b = calloc(1, sizeof *b);
  if (!b) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  lmoe_object_init(&b->obj, LMOE_MAGIC_BATCH, batch_destroy);
  b->offsets = calloc(1, sizeof *b->offsets);
  if (!b->offsets) {
    free(b);
    return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  }
  b->max_slot = -1;
  lmoe_context_retain(ctx);
  b->ctx = ctx;
  *out = b;
  return LMOE_OK;
}

void lmoe_batch_release(lmoe_batch *b) {
  if (lmoe_object_is(b, LMOE_MAGIC_BATCH)) lmoe_object_release(&b->obj);
}

static lmoe_status grow(lmoe_batch *b, int32_t n, int32_t max_slot) {
  if (n > b->capacity) {
    int64_t *o = realloc(b->offsets, ((size_t)n + 1) * sizeof *o);
    if (!o) return lmoe_fail(b->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    b->offsets = o;
    int32_t *s = realloc(b->req_slot, (size_t)n * sizeof *s);
    if (!s) return lmoe_fail(b->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    b->req_slot = s;
    b->capacity = n;
  }
  if (max_slot + 1 > b->active_cap) {
    int32_t *a = realloc(b->active_slots, ((size_t)max_slot + 1) * sizeof *a);
    if (!a) return lmoe_fail(b->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    b->active_slots = a;
    int64_t *t = realloc(b->active_tokens, ((size_t)max_slot + 1) * sizeof *t);
    if (!t) return lmoe_fail(b->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    b->active_tokens = t;
    b->active_cap = max_slot + 1;
  }
  return LMOE_OK;
}

lmoe_status lmoe_batch_set(lmoe_batch *b, lmoe_pool *pool, int32_t n, const int32_t *tokens,
                           const int32_t *slots) {
  if (!b || b->obj.magic != LMOE_MAGIC_BATCH) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *ctx = b->ctx;
  if (pool && pool->obj.magic != LMOE_MAGIC_POOL)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "pool is not a loramoe pool");
  if (n < 0) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "num_requests is negative (%d)", (int)n);
  if (n > 0 && !tokens) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "tokens is NULL");
  /* Validate everything before touching the batch, so a failed set leaves it as it was. */
  int32_t max_slot = -1;
  int64_t total = 0;
  for (int32_t i = 0; i < n; i++) {
    if (tokens[i] < 0)
      return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "request %d has a negative token count (%d)",
                       (int)i, (int)tokens[i]);
    total += tokens[i];
    int32_t s = slots ? slots[i] : LMOE_NO_ADAPTER;
    if (s == LMOE_NO_ADAPTER) continue;
    if (s < 0)
      return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                       "request %d has slot %d: a slot is >= 0, or -1 for no adapter", (int)i, (int)s);
    if (pool) {
      if (s >= pool->cfg.num_slots)
        return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                         "request %d uses slot %d, but the pool has slots 0..%d", (int)i, (int)s,
                         (int)pool->cfg.num_slots - 1);
      if (!pool->slots[s].loaded)
        return lmoe_fail(ctx, LMOE_ERR_STATE, "request %d uses slot %d, which holds no adapter",
                         (int)i, (int)s);
    } else if (s >= (1 << 20)) {
      return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "request %d uses slot %d, which is too large",
                       (int)i, (int)s);
    }
    if (tokens[i] > 0 && s > max_slot) max_slot = s;
  }
  if (total > INT32_MAX)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "the batch has more than 2^31 tokens");
  lmoe_status st = grow(b, n, max_slot);
  if (st) return st;

  /* Slots are small integers: count tokens per slot in a table indexed by slot, then
     compact it into the sorted active list. O(n + max_slot), no sort. */
  if (max_slot >= 0) memset(b->active_tokens, 0, ((size_t)max_slot + 1) * sizeof *b->active_tokens);
  int64_t off = 0;
  b->offsets[0] = 0;
  for (int32_t i = 0; i < n; i++) {
    int32_t s = slots ? slots[i] : LMOE_NO_ADAPTER;
    b->req_slot[i] = s;
    off += tokens[i];
    b->offsets[i + 1] = off;
    if (s >= 0 && tokens[i] > 0) b->active_tokens[s] += tokens[i];
  }
  int32_t na = 0, max_rank = 0;
  for (int32_t s = 0; s <= max_slot; s++) {
    if (!b->active_tokens[s]) continue;
    b->active_slots[na] = s;
    b->active_tokens[na] = b->active_tokens[s]; /* na <= s: compacting in place is safe */
    na++;
    if (pool) {
      int32_t r = lmoe_pool_slot_rank(pool, s);
      if (r > max_rank) max_rank = r;
    }
  }
  b->num_requests = n;
  b->num_tokens = total;
  b->num_active = na;
  b->max_rank = max_rank;
  b->max_slot = max_slot;
  b->version++;
  /* The slots of a batch being built are the most recently used (LRU, pool.c). */
  if (pool && na) lmoe_pool_note_use(pool, b->active_slots, na);
  /* A backend refusal here (a captured batch outgrowing its staging) comes after the
     batch changed: the batch is marked, and forwards refuse it until a set succeeds,
     rather than computing the new requests with the old metadata. */
  st = ctx->ops->batch_stage ? ctx->ops->batch_stage(ctx, b) : LMOE_OK;
  b->unstaged = st != LMOE_OK;
  return st;
}

lmoe_status lmoe_batch_get_info(const lmoe_batch *b, lmoe_batch_info *out) {
  if (!b || !out || b->obj.magic != LMOE_MAGIC_BATCH) return LMOE_ERR_INVALID_ARGUMENT;
  out->num_requests = b->num_requests;
  out->num_tokens = b->num_tokens;
  out->has_active = b->num_active > 0;
  out->num_active = b->num_active;
  out->max_rank = b->max_rank;
  out->max_slot = b->max_slot;
  return LMOE_OK;
}

int32_t lmoe_batch_offsets(const lmoe_batch *b, int64_t *out, int32_t capacity) {
  if (!b || !out || b->obj.magic != LMOE_MAGIC_BATCH || capacity <= 0) return 0;
  int32_t n = b->num_requests + 1 < capacity ? b->num_requests + 1 : capacity;
  memcpy(out, b->offsets, (size_t)n * sizeof *out);
  return n;
}

int32_t lmoe_batch_active_slots(const lmoe_batch *b, int32_t *slots, int64_t *tokens,
                                int32_t capacity) {
  if (!b || b->obj.magic != LMOE_MAGIC_BATCH || capacity < 0) return 0;
  int32_t n = b->num_active < capacity ? b->num_active : capacity;
  /* n > 0: the arrays are NULL until a batch has had an active slot (memcpy(_, NULL, 0)
     is undefined behaviour, and UBSan says so) */
  if (slots && n > 0) memcpy(slots, b->active_slots, (size_t)n * sizeof *slots);
  if (tokens && n > 0) memcpy(tokens, b->active_tokens, (size_t)n * sizeof *tokens);
  return n;
}
