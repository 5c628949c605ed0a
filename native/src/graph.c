/* Graphs: capture forwards on a stream once, replay them with one launch. The core
   keeps the bookkeeping (one capture per context, counters, a failed forward spoils
   the capture); the backend's optional graph ops do the capturing. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

static lmoe_status unsupported(lmoe_context *ctx) {
  return lmoe_fail(ctx, LMOE_ERR_UNSUPPORTED,
                   "graphs need the cuda backend (this context uses the %s backend)", ctx->ops->name);
}

lmoe_status lmoe_graph_begin(lmoe_context *ctx, void *stream) {
  if (!ctx || ctx->obj.magic != LMOE_MAGIC_CONTEXT) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ctx);
  if (!ctx->ops->graph_begin) return unsupported(ctx);
  if (ctx->capturing)
    return lmoe_fail(ctx, LMOE_ERR_STATE,
                     "a capture is already in progress on this context (end it with lmoe_graph_end)");
  void *s = stream ? stream : ctx->stream;
  lmoe_status st = ctx->ops->graph_begin(ctx, s);
  if (st) return st;
  ctx->capturing = 1;
  ctx->capture_stream = s;
  ctx->capture_failed = LMOE_OK;
  ctx->capture_start = ctx->counters;
  return LMOE_OK;
}

/* Work counted while capturing did not run: move it from the context's counters into
   the graph's per-replay figures. A reset during the capture leaves nothing to move. */
static uint64_t take(uint64_t *now, uint64_t start) {
  if (*now < start) return 0;
  uint64_t d = *now - start;
  *now = start;
  return d;
}

static void graph_destroy(lmoe_object *obj) {
  lmoe_graph *g = (lmoe_graph *)obj;
  lmoe_context *ctx = g->ctx;
  if (g->be) ctx->ops->graph_free(ctx, g->be);
  free(g);
  lmoe_context_release(ctx);
}

lmoe_status lmoe_graph_end(lmoe_context *ctx, void *stream, lmoe_graph **out) {
  if (out) *out = NULL;
  if (!ctx || ctx->obj.magic != LMOE_MAGIC_CONTEXT) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ctx);
  if (!ctx->ops->graph_end) return unsupported(ctx);
  if (!out) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "out is NULL");
  if (!ctx->capturing) return lmoe_fail(ctx, LMOE_ERR_STATE, "no capture is in progress (call lmoe_graph_begin)");
  void *s = stream ? stream : ctx->stream;
  if (s != ctx->capture_stream)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "the capture was begun on another stream; end it on that one");
  lmoe_status failed = ctx->capture_failed;
  lmoe_counters d;
  memset(&d, 0, sizeof d);
  d.forwards = take(&ctx->counters.forwards, ctx->capture_start.forwards);
  d.launches = take(&ctx->counters.launches, ctx->capture_start.launches);
  d.lora_launches = take(&ctx->counters.lora_launches, ctx->capture_start.lora_launches);
  d.uploads = take(&ctx->counters.uploads, ctx->capture_start.uploads);
  d.bytes_uploaded = take(&ctx->counters.bytes_uploaded, ctx->capture_start.bytes_uploaded);
  ctx->capturing = 0;
  ctx->capture_stream = NULL;
  ctx->capture_failed = LMOE_OK;

  lmoe_graph *g = calloc(1, sizeof *g);
  void *exec = NULL;
  lmoe_status st = ctx->ops->graph_end(ctx, s, &exec); /* always ends the capture */
  if (!st && !g) st = lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  if (!st && failed)
    st = lmoe_fail(ctx, failed,
                   "a forward failed during the capture (%s), so the graph would miss its work; "
                   "the capture was discarded", lmoe_status_string(failed));
  if (st) {
    if (exec) ctx->ops->graph_free(ctx, exec);
    free(g);
    return st;
  }
  lmoe_object_init(&g->obj, LMOE_MAGIC_GRAPH, graph_destroy);
  g->ctx = ctx;
  g->be = exec;
  g->per_launch = d;
  lmoe_context_retain(ctx);
  *out = g;
  return LMOE_OK;
}

lmoe_status lmoe_graph_launch(lmoe_graph *g, void *stream) {
  if (!g || g->obj.magic != LMOE_MAGIC_GRAPH) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *ctx = g->ctx;
  lmoe_clear_error(ctx);
  lmoe_status st = ctx->ops->graph_launch(ctx, g->be, stream ? stream : ctx->stream);
  if (st) return st;
  /* One launch from the host; the forwards and uploads it replays count as done. */
  ctx->counters.launches++;
  ctx->counters.forwards += g->per_launch.forwards;
  ctx->counters.uploads += g->per_launch.uploads;
  ctx->counters.bytes_uploaded += g->per_launch.bytes_uploaded;
  return LMOE_OK;
}

void lmoe_graph_release(lmoe_graph *g) {
  if (lmoe_object_is(g, LMOE_MAGIC_GRAPH)) lmoe_object_release(&g->obj);
}
