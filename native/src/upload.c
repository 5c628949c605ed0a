/* Staged uploads: large host data (checkpoint weights) bound for device memory, moved in
   bounded chunks through two reusable staging buffers of the context, page-locked where
   the backend has that. The host fills one buffer while the copy out of the other runs
   on the context's stream: one stream-ordered copy per chunk, whatever the data's
   parts, and a host wait only when the host fills faster than the copies drain (a
   backpressure wait: the two buffers are a ring of two). lmoe_upload_end waits once at
   the end for the last copies; lmoe_upload_finish (pool loads) does not: its copies
   stay enqueued, ordered on the context's stream before whatever comes next there,
   and the buffers remember that they are in flight, so the next upload waits for one
   only if it needs it before its copy ran. Host memory stays at two chunks however
   large the data.

   A backend whose device memory is host memory needs none of it: the span handed out
   is the destination itself, so a reader writes the data in place. */
#include "internal.h"

#include <string.h>

void lmoe_upload_staging_free(lmoe_context *ctx) {
  for (int i = 0; i < 2; i++) {
    if (ctx->staging.inflight[i]) { /* a copy may still read it: let it run first */
      bool waited = false;
      ctx->ops->event_wait(ctx, ctx->staging.ev[i], &waited);
      ctx->staging.inflight[i] = false;
    }
    if (ctx->staging.buf[i]) {
      if (ctx->staging.pinned) ctx->ops->pinned_free(ctx, ctx->staging.buf[i]);
      else ctx->ops->free(ctx, LMOE_MEMORY_HOST, ctx->staging.buf[i]);
    }
    if (ctx->staging.ev[i]) ctx->ops->event_destroy(ctx, ctx->staging.ev[i]);
    ctx->staging.buf[i] = ctx->staging.ev[i] = NULL;
  }
}

/* The staging, made on first use: page-locked buffers only with events to tell when a
   copy out of them has run (without, copies are blocking and pageable memory does). */
static lmoe_status staging_make(lmoe_context *ctx) {
  if (ctx->staging.buf[0]) return LMOE_OK;
  const lmoe_backend_ops *ops = ctx->ops;
  if (!ctx->staging.chunk) ctx->staging.chunk = LMOE_STAGING_CHUNK;
  bool events = ops->event_create && ops->event_record && ops->event_wait && ops->event_destroy;
  ctx->staging.pinned = events && ops->pinned_alloc && ops->pinned_free;
  lmoe_status st = LMOE_OK;
  for (int i = 0; i < 2 && !st; i++) {
    st = ctx->staging.pinned ? ops->pinned_alloc(ctx, ctx->staging.chunk, &ctx->staging.buf[i])
                             : ops->alloc(ctx, LMOE_MEMORY_HOST, ctx->staging.chunk, &ctx->staging.buf[i]);
    if (!st && events) st = ops->event_create(ctx, &ctx->staging.ev[i]);
  }
  if (st) lmoe_upload_staging_free(ctx);
  return st;
}

lmoe_status lmoe_upload_begin(lmoe_context *ctx, lmoe_upload *u) {
  memset(u, 0, sizeof *u);
  u->ctx = ctx;
  u->direct = ctx->ops->caps.host_memory;
  u->st = u->direct ? LMOE_OK : staging_make(ctx);
  u->cur = ctx->staging.next; /* the buffers take turns across uploads too */
  return u->st;
}

/* Waits until the copy out of buffer i (if any) has run, counting a wait it had to
   make: backpressure when the buffer is needed again, forced at the end of an upload
   that waits for its copies. */
static lmoe_status drain(lmoe_upload *u, int i, bool backpressure) {
  lmoe_context *ctx = u->ctx;
  if (!ctx->staging.inflight[i]) return LMOE_OK;
  bool waited = false;
  lmoe_status st = ctx->ops->event_wait(ctx, ctx->staging.ev[i], &waited);
  if (waited) lmoe_count_wait(ctx, backpressure);
  ctx->staging.inflight[i] = false;
  return st;
}

/* Enqueues the copy of the filled buffer and turns to the other one. */
static lmoe_status flush(lmoe_upload *u) {
  lmoe_context *ctx = u->ctx;
  if (u->pending == 0) return LMOE_OK;
  int i = u->cur;
  bool async = ctx->staging.ev[i] != NULL;
  lmoe_status st = ctx->ops->copy(ctx, u->dst, LMOE_MEMORY_DEVICE, ctx->staging.buf[i], LMOE_MEMORY_HOST,
                                  u->pending, ctx->stream, !async);
  ctx->counters.uploads++;
  ctx->counters.bytes_uploaded += u->pending;
  if (!st && async) st = ctx->ops->event_record(ctx, ctx->staging.ev[i], ctx->stream);
  if (!st && async) ctx->staging.inflight[i] = true;
  if (!async && !ctx->ops->caps.synchronous) lmoe_count_wait(ctx, false);
  u->pending = 0;
  u->cur ^= 1;
  ctx->staging.next = u->cur;
  return st;
}

/* Sends what is staged now, so the next span starts a new copy: a caller moving to
   another allocation calls it, because two allocations may lie back to back in the
   device's address space and one copy must not run across both (CUDA refuses it). */
lmoe_status lmoe_upload_flush(lmoe_upload *u) {
  if (!u->direct && !u->st) u->st = flush(u);
  return u->st;
}

lmoe_status lmoe_upload_span(lmoe_upload *u, void *dst, size_t want, void **host, size_t *n) {
  *host = NULL;
  *n = 0;
  if (u->st) return u->st;
  if (u->direct) {
    *host = dst;
    *n = want;
    return LMOE_OK;
  }
  size_t chunk = u->ctx->staging.chunk;
  if (u->pending && ((uint8_t *)dst != u->dst + u->pending || u->pending == chunk)) u->st = flush(u);
  /* a buffer about to be filled may still be read by an enqueued copy */
  if (!u->st && u->pending == 0) u->st = drain(u, u->cur, true);
  if (u->st) return u->st;
  if (u->pending == 0) u->dst = dst;
  *host = (uint8_t *)u->ctx->staging.buf[u->cur] + u->pending;
  *n = want < chunk - u->pending ? want : chunk - u->pending;
  return LMOE_OK;
}

void lmoe_upload_commit(lmoe_upload *u, size_t n) {
  if (!u->direct && !u->st) u->pending += n;
}

lmoe_status lmoe_upload_finish(lmoe_upload *u) {
  if (u->direct) return u->st;
  lmoe_status st = u->st ? u->st : flush(u);
  u->st = st;
  return st;
}

lmoe_status lmoe_upload_end(lmoe_upload *u) {
  if (u->direct) return u->st;
  lmoe_status st = lmoe_upload_finish(u);
  for (int i = 0; i < 2; i++) {
    lmoe_status s2 = drain(u, i, false);
    if (!st) st = s2;
  }
  u->st = st;
  return st;
}
