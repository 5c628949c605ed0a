/* Batch: requests -> the batch's facts, computed once here, on the host, in the
   encoded form the backends read (batch_meta.h). Nothing else re-derives them: the
   forward checks the active slots against the pool as it is then
   (lmoe_batch_check_pool), the backends decode the encoding. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

static void batch_destroy(lmoe_object *obj) {
  lmoe_batch *b = (lmoe_batch *)obj;
  lmoe_context *ctx = b->ctx;
  if (ctx->ops->batch_fini) ctx->ops->batch_fini(ctx, b);
  free(b->meta);
  free(b->active_tokens);
  free(b->slot_table);
  free(b);
  lmoe_context_release(ctx);
}

void lmoe_batch_config_init_sized(lmoe_batch_config *cfg, size_t size) {
  lmoe_batch_config def;
  memset(&def, 0, sizeof def);
  def.staging_depth = 4;
  lmoe_struct_init(cfg, size, &def, sizeof def, sizeof(uint32_t));
}

lmoe_status lmoe_batch_create(lmoe_context *ctx, lmoe_batch **out) {
  return lmoe_batch_create_with(ctx, NULL, out);
}

lmoe_status lmoe_batch_create_with(lmoe_context *ctx, const lmoe_batch_config *cfg_in, lmoe_batch **out) {
  if (!lmoe_object_is(ctx, LMOE_MAGIC_CONTEXT)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ctx);
  if (!out) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "out is NULL");
  *out = NULL;
  lmoe_batch_config cfg; /* every field has a default */
  lmoe_batch_config_init(&cfg);
  if (cfg_in) {
    lmoe_status st = lmoe_struct_in(ctx, &cfg, sizeof cfg, sizeof(uint32_t), cfg_in, "batch config",
                                    "lmoe_batch_config_init");
    if (st) return st;
  }
  if (cfg.staging_depth < 1 || cfg.staging_depth > 64)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "staging_depth must be 1..64, got %d",
                     (int)cfg.staging_depth);
  lmoe_batch *b = calloc(1, sizeof *b);
  if (!b) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  lmoe_object_init(&b->obj, LMOE_MAGIC_BATCH, batch_destroy);
  b->meta_cap = LMOE_META_WORDS(0, 0);
  b->meta = calloc(b->meta_cap, sizeof *b->meta); /* 0 requests, 0 active, offsets {0} */
  if (!b->meta) {
    free(b);
    return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  }
  b->max_slot = -1;
  b->depth = cfg.staging_depth;
  lmoe_context_retain(ctx);
  b->ctx = ctx;
  *out = b;
  return LMOE_OK;
}

void lmoe_batch_release(lmoe_batch *b) {
  if (lmoe_object_is(b, LMOE_MAGIC_BATCH)) lmoe_object_release(&b->obj);
}

/* Room for n requests and slots 0..max_slot (at most max_slot + 1 active). */
static lmoe_status grow(lmoe_batch *b, int32_t n, int32_t max_slot) {
  size_t words = LMOE_META_WORDS(n, max_slot + 1);
  if (words > b->meta_cap) {
    int32_t *m = realloc(b->meta, words * sizeof *m);
    if (!m) return lmoe_fail(b->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    b->meta = m;
    b->meta_cap = words;
  }
  if (max_slot + 1 > b->table_cap) {
    int64_t *t = realloc(b->active_tokens, ((size_t)max_slot + 1) * sizeof *t);
    if (!t) return lmoe_fail(b->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    b->active_tokens = t;
    t = realloc(b->slot_table, ((size_t)max_slot + 1) * sizeof *t);
    if (!t) return lmoe_fail(b->ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
    b->slot_table = t;
    b->table_cap = max_slot + 1;
  }
  return LMOE_OK;
}

lmoe_status lmoe_batch_set(lmoe_batch *b, lmoe_pool *pool, int32_t n, const int32_t *tokens,
                           const int32_t *slots) {
  if (!lmoe_object_is(b, LMOE_MAGIC_BATCH)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *ctx = b->ctx;
  if (pool && !lmoe_object_is(pool, LMOE_MAGIC_POOL))
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

  /* Slots are small integers: count tokens per slot in a table indexed by slot, walk it
     once in slot order into the active list (increasing, no sort), leaving each active
     slot's group in the table; then each request's group. O(n + max_slot). */
  int64_t *table = b->slot_table;
  if (max_slot >= 0) memset(table, 0, ((size_t)max_slot + 1) * sizeof *table);
  for (int32_t i = 0; i < n; i++) {
    int32_t s = slots ? slots[i] : LMOE_NO_ADAPTER;
    if (s >= 0 && tokens[i] > 0) table[s] += tokens[i];
  }
  int32_t *m = b->meta;
  int32_t *active = m + 3 + 2 * (size_t)n;
  int32_t na = 0, max_rank = 0;
  for (int32_t s = 0; s <= max_slot; s++) {
    if (!table[s]) continue;
    active[na] = s;
    b->active_tokens[na] = table[s];
    table[s] = ++na; /* the slot's group */
    if (pool) {
      int32_t r = lmoe_pool_slot_rank(pool, s);
      if (r > max_rank) max_rank = r;
    }
  }
  m[0] = n;
  m[1] = na;
  int32_t *off = m + 2, *group = m + 3 + n;
  off[0] = 0;
  for (int32_t i = 0; i < n; i++) {
    int32_t s = slots ? slots[i] : LMOE_NO_ADAPTER;
    off[i + 1] = off[i] + tokens[i];
    group[i] = s >= 0 && s <= max_slot ? (int32_t)table[s] : 0;
  }
  b->num_tokens = total;
  b->max_rank = max_rank;
  b->max_slot = max_slot;
  b->version++;
  /* The slots of a batch being built are the most recently used (LRU, pool.c). */
  if (pool && na) lmoe_pool_note_use(pool, active, na);
  /* A backend refusal here (a captured batch outgrowing its staging) comes after the
     batch changed: the batch is marked, and forwards refuse it until a set succeeds,
     rather than computing the new requests with the old metadata. */
  st = ctx->ops->batch_stage ? ctx->ops->batch_stage(ctx, b) : LMOE_OK;
  b->unstaged = st != LMOE_OK;
  return st;
}

lmoe_status lmoe_batch_check_pool(const lmoe_batch *b, const lmoe_pool *p) {
  lmoe_context *ctx = b->ctx;
  int32_t na = lmoe_meta_active_count(b->meta);
  if (na == 0) return LMOE_OK;
  if (!p)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "the batch uses adapters (%d slots) but no pool was given",
                     (int)na);
  const int32_t *active = lmoe_meta_active(b->meta);
  for (int32_t i = 0; i < na; i++) {
    int32_t s = active[i];
    if (s >= p->cfg.num_slots)
      return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "the batch uses slot %d, but the pool has slots 0..%d",
                       (int)s, (int)p->cfg.num_slots - 1);
    if (!p->slots[s].loaded)
      return lmoe_fail(ctx, LMOE_ERR_STATE, "the batch uses slot %d, which holds no adapter", (int)s);
  }
  return LMOE_OK;
}

lmoe_status lmoe_batch_get_info(const lmoe_batch *b, lmoe_batch_info *out) {
  if (!lmoe_object_is(b, LMOE_MAGIC_BATCH) || !out) return LMOE_ERR_INVALID_ARGUMENT;
  out->num_requests = lmoe_meta_requests(b->meta);
  out->num_tokens = b->num_tokens;
  out->num_active = lmoe_meta_active_count(b->meta);
  out->has_active = out->num_active > 0;
  out->max_rank = b->max_rank;
  out->max_slot = b->max_slot;
  return LMOE_OK;
}

int32_t lmoe_batch_offsets(const lmoe_batch *b, int64_t *out, int32_t capacity) {
  if (!lmoe_object_is(b, LMOE_MAGIC_BATCH) || !out || capacity <= 0) return 0;
  int32_t n = lmoe_meta_requests(b->meta) + 1;
  if (n > capacity) n = capacity;
  const int32_t *off = lmoe_meta_offsets(b->meta);
  for (int32_t i = 0; i < n; i++) out[i] = off[i];
  return n;
}

int32_t lmoe_batch_active_slots(const lmoe_batch *b, int32_t *slots, int64_t *tokens,
                                int32_t capacity) {
  if (!lmoe_object_is(b, LMOE_MAGIC_BATCH) || capacity < 0) return 0;
  int32_t na = lmoe_meta_active_count(b->meta);
  int32_t n = na < capacity ? na : capacity;
  /* n > 0: active_tokens is NULL until a batch has had an active slot (memcpy(_, NULL,
     0) is undefined behaviour, and UBSan says so) */
  if (slots && n > 0) memcpy(slots, lmoe_meta_active(b->meta), (size_t)n * sizeof *slots);
  if (tokens && n > 0) memcpy(tokens, b->active_tokens, (size_t)n * sizeof *tokens);
  return n;
}
