/* Context: a backend on a device, its stream, counters, the workspace its forwards
   share, and the registry of live contexts. The backend comes from backends.c, the
   error text is error.c's, the reference count object.c's. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *lmoe_version(void) { return "0.1.0"; }

void lmoe_context_config_init_sized(lmoe_context_config *cfg, size_t size) {
  lmoe_context_config def;
  memset(&def, 0, sizeof def);
  def.backend = LMOE_BACKEND_AUTO;
  def.guard = LMOE_GUARD_HOST;
  lmoe_struct_init(cfg, size, &def, sizeof def, sizeof(uint32_t));
}

static lmoe_status create_fail(char *errbuf, size_t n, lmoe_status st, const char *msg) {
  if (errbuf && n) snprintf(errbuf, n, "%s", msg);
  return st;
}

/* Live contexts, by address only (never dereferenced), so a binding can refuse a
   pointer that is not one before touching it (lmoe_context_is_live). A spinlock: the
   list is touched only at create and destroy, and needs no thread library. */
static atomic_flag live_lock = ATOMIC_FLAG_INIT;
static const void **live = NULL;
static size_t live_n = 0, live_cap = 0;

static void live_acquire(void) { while (atomic_flag_test_and_set_explicit(&live_lock, memory_order_acquire)) {} }
static void live_release(void) { atomic_flag_clear_explicit(&live_lock, memory_order_release); }

static int live_add(const void *p) {
  int ok = 1;
  live_acquire();
  if (live_n == live_cap) {
    size_t cap = live_cap ? 2 * live_cap : 16;
    const void **n = realloc(live, cap * sizeof *n);
    if (n) {
      live = n;
      live_cap = cap;
    } else {
      ok = 0;
    }
  }
  if (ok) live[live_n++] = p;
  live_release();
  return ok;
}

static void live_remove(const void *p) {
  live_acquire();
  for (size_t i = 0; i < live_n; i++)
    if (live[i] == p) {
      live[i] = live[--live_n];
      break;
    }
  if (live_n == 0) { /* nothing left: a process that releases everything frees it too */
    free(live);
    live = NULL;
    live_cap = 0;
  }
  live_release();
}

int32_t lmoe_context_is_live(const void *ptr) {
  int32_t found = 0;
  if (!ptr) return 0;
  live_acquire();
  for (size_t i = 0; i < live_n && !found; i++) found = live[i] == ptr;
  live_release();
  return found;
}

static void context_destroy(lmoe_object *obj) {
  lmoe_context *ctx = (lmoe_context *)obj;
  live_remove(ctx);
  lmoe_upload_staging_free(ctx);
  if (ctx->workspace) ctx->ops->free(ctx, LMOE_MEMORY_DEVICE, ctx->workspace);
  ctx->ops->fini(ctx);
  free(ctx);
}

lmoe_status lmoe_context_create(const lmoe_context_config *cfg_in, lmoe_context **out,
                                char *errbuf, size_t errbuf_size) {
  if (errbuf && errbuf_size) errbuf[0] = '\0';
  if (!out) return create_fail(errbuf, errbuf_size, LMOE_ERR_INVALID_ARGUMENT, "out is NULL");
  *out = NULL;
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  if (cfg_in) { /* every field has a default: any size from 4 (structs.c) */
    char msg[LMOE_ERRBUF];
    if (!lmoe_struct_size_ok(cfg_in->struct_size, sizeof cfg, sizeof(uint32_t), "context config",
                             "lmoe_context_config_init", msg, sizeof msg))
      return create_fail(errbuf, errbuf_size, LMOE_ERR_INVALID_ARGUMENT, msg);
    memcpy(&cfg, cfg_in, cfg_in->struct_size);
    cfg.struct_size = sizeof cfg;
  }
  if (cfg.backend < LMOE_BACKEND_AUTO || cfg.backend > LMOE_BACKEND_CUDA)
    return create_fail(errbuf, errbuf_size, LMOE_ERR_INVALID_ARGUMENT,
                       "backend must be auto, cpu or cuda");
  if (cfg.guard < LMOE_GUARD_HOST || cfg.guard > LMOE_GUARD_ALWAYS)
    return create_fail(errbuf, errbuf_size, LMOE_ERR_INVALID_ARGUMENT,
                       "guard must be host, device_sync or always");
  if (cfg.threads < 0 || cfg.threads > 1024)
    return create_fail(errbuf, errbuf_size, LMOE_ERR_INVALID_ARGUMENT,
                       "threads must be 0 (one per core) .. 1024");
  if (cfg.device < 0)
    return create_fail(errbuf, errbuf_size, LMOE_ERR_INVALID_ARGUMENT, "device must be >= 0");
  if ((cfg.allocator.alloc == NULL) != (cfg.allocator.free == NULL))
    return create_fail(errbuf, errbuf_size, LMOE_ERR_INVALID_ARGUMENT,
                       "allocator.alloc and allocator.free must be given together");

  lmoe_status st;
  const char *why;
  const lmoe_backend_ops *ops = lmoe_backend_select(cfg.backend, cfg.device, &st, &why);
  if (!ops) return create_fail(errbuf, errbuf_size, st, why);

  lmoe_context *ctx = calloc(1, sizeof *ctx);
  if (!ctx) return create_fail(errbuf, errbuf_size, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  lmoe_object_init(&ctx->obj, LMOE_MAGIC_CONTEXT, context_destroy);
  ctx->ops = ops;
  ctx->device = cfg.device;
  ctx->stream = cfg.stream;
  ctx->threads = cfg.threads;
  ctx->guard = cfg.guard;
  ctx->allocator = cfg.allocator;
  st = ops->init(ctx);
  if (st != LMOE_OK) {
    create_fail(errbuf, errbuf_size, st, ctx->error[0] ? ctx->error : lmoe_status_string(st));
    free(ctx);
    return st;
  }
  if (!live_add(ctx)) {
    ctx->ops->fini(ctx);
    free(ctx);
    return create_fail(errbuf, errbuf_size, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  }
  *out = ctx;
  return LMOE_OK;
}

void lmoe_context_retain(lmoe_context *ctx) {
  if (lmoe_object_is(ctx, LMOE_MAGIC_CONTEXT)) lmoe_object_retain(&ctx->obj);
}

void lmoe_context_release(lmoe_context *ctx) {
  if (lmoe_object_is(ctx, LMOE_MAGIC_CONTEXT)) lmoe_object_release(&ctx->obj);
}

int32_t lmoe_context_backend(const lmoe_context *ctx) { return ctx ? ctx->ops->kind : -1; }
int32_t lmoe_context_threads(const lmoe_context *ctx) { return ctx ? ctx->threads : 0; }
int32_t lmoe_context_guard(const lmoe_context *ctx) { return ctx ? ctx->guard : -1; }
void *lmoe_context_stream(const lmoe_context *ctx) { return ctx ? ctx->stream : NULL; }

lmoe_status lmoe_context_set_guard(lmoe_context *ctx, int32_t guard) {
  if (!ctx) return LMOE_ERR_INVALID_ARGUMENT;
  if (guard < LMOE_GUARD_HOST || guard > LMOE_GUARD_ALWAYS)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "guard %d is not one of host (0), device_sync (1), always (2)", (int)guard);
  ctx->guard = guard;
  return LMOE_OK;
}

lmoe_status lmoe_context_synchronize(lmoe_context *ctx, void *stream) {
  if (!ctx) return LMOE_ERR_INVALID_ARGUMENT;
  ctx->counters.host_waits++;
  return ctx->ops->synchronize(ctx, stream ? stream : ctx->stream);
}

lmoe_status lmoe_context_counters(const lmoe_context *ctx, lmoe_counters *out) {
  if (!ctx || !out) return LMOE_ERR_INVALID_ARGUMENT;
  *out = ctx->counters;
  return LMOE_OK;
}

void lmoe_context_reset_counters(lmoe_context *ctx) {
  if (!ctx) return;
  memset(&ctx->counters, 0, sizeof ctx->counters);
  ctx->backpressure_waits = 0;
}

lmoe_status lmoe_context_wait_counters(const lmoe_context *ctx, lmoe_wait_counters *out) {
  if (!lmoe_object_is(ctx, LMOE_MAGIC_CONTEXT) || !out) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_wait_counters w;
  memset(&w, 0, sizeof w);
  w.struct_size = sizeof w;
  w.host_waits = ctx->counters.host_waits;
  w.backpressure = ctx->backpressure_waits <= w.host_waits ? ctx->backpressure_waits : w.host_waits;
  w.forced = w.host_waits - w.backpressure;
  return lmoe_struct_out((lmoe_context *)ctx, out, &w, sizeof w, "wait counters",
                         "lmoe_context_wait_counters with struct_size = sizeof(lmoe_wait_counters)");
}

/* Grows the workspace to what a layer (and a pool on it) may need. Called where layers
   and pools are made, never in a forward. */
lmoe_status lmoe_context_reserve(lmoe_context *ctx, const lmoe_layer_config *cfg,
                                 const lmoe_pool_config *pool_cfg) {
  size_t need = ctx->ops->workspace_bytes ? ctx->ops->workspace_bytes(ctx, cfg, pool_cfg) : 0;
  if (need <= ctx->workspace_bytes) return LMOE_OK;
  void *p = NULL;
  lmoe_status st = ctx->ops->alloc(ctx, LMOE_MEMORY_DEVICE, need, &p);
  if (st) return st;
  if (ctx->workspace) {
    /* Enqueued work may still use the old workspace: wait before freeing it. This
       happens only when a larger layer or pool is made, never in a forward. */
    ctx->counters.host_waits++;
    st = ctx->ops->synchronize(ctx, ctx->stream);
    if (st) {
      ctx->ops->free(ctx, LMOE_MEMORY_DEVICE, p);
      return st;
    }
    ctx->ops->free(ctx, LMOE_MEMORY_DEVICE, ctx->workspace);
  }
  ctx->workspace = p;
  ctx->workspace_bytes = need;
  return LMOE_OK;
}
