/* lmoe_forward_group: the forwards of all ranks of a sharded layer from one thread
   (docs/design.md, "Sharding"). Every rank's arguments are checked first, nothing runs
   unless all are good; on the cpu the ranks' forwards run one after another and their
   partial outputs are summed once at the end (comm.c's collect_begin/end); over NCCL
   the forwards each leave their partial by column chunks, then each chunk's all-reduces
   are one NCCL group and each rank's rounding of the chunk follows the group's end (the
   backend overlaps a chunk's sum with the next chunk's compute); ranks sharing one
   device (a group communicator of device contexts) are the backend's group_forward:
   the forwards and one summing kernel on one stream. Its own file so that comm.c, which forward.c calls
   for the sum, never calls back into forward.c. */
#include "internal.h"

#include <stdlib.h>

#ifdef LMOE_HAVE_NCCL
#include <nccl.h>
#endif

#ifdef LMOE_HAVE_NCCL
static void *rank_stream(lmoe_context *ctx, void *const *streams, int32_t r) {
  return streams && streams[r] ? streams[r] : ctx->stream;
}

/* shard_chunk of rank r, its error reported on c0 too */
static lmoe_status shard_chunk(lmoe_context *c0, lmoe_context *ctx, const lmoe_forward_plan *plan, int32_t c,
                               int32_t phase, void *stream, int32_t r) {
  lmoe_status st = ctx->ops->shard_chunk(ctx, plan, c, phase, stream);
  if (st && ctx != c0) lmoe_fail(c0, st, "rank %d: %s", (int)r, lmoe_context_last_error(ctx));
  return st;
}
#endif

lmoe_status lmoe_forward_group(int32_t n, lmoe_context *const *ctxs, const lmoe_forward_args *const *args,
                               void *const *streams) {
  if (n < 1 || n > 4096 || !ctxs || !args || !lmoe_object_is(ctxs[0], LMOE_MAGIC_CONTEXT))
    return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_context *c0 = ctxs[0];
  lmoe_clear_error(c0);
  lmoe_forward_plan *plans = calloc((size_t)n, sizeof *plans);
  if (!plans) return lmoe_fail(c0, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  lmoe_status st = LMOE_OK;
  lmoe_comm_group *g = NULL;
  /* Every rank's arguments first: nothing runs unless all are good. */
  for (int32_t r = 0; r < n && !st; r++) {
    lmoe_context *ctx = ctxs[r];
    if (!lmoe_object_is(ctx, LMOE_MAGIC_CONTEXT)) {
      st = lmoe_fail(c0, LMOE_ERR_INVALID_ARGUMENT, "ctxs[%d] is %s", (int)r, ctx ? "not a loramoe context" : "NULL");
      break;
    }
    for (int32_t q = 0; q < r && !st; q++)
      if (ctxs[q] == ctx)
        st = lmoe_fail(c0, LMOE_ERR_INVALID_ARGUMENT, "ctxs[%d] is ctxs[%d]: every rank has a context of its own",
                       (int)r, (int)q);
    if (st) break;
    st = lmoe_forward_validate(ctx, args[r], &plans[r], false);
    if (st) {
      if (ctx != c0) lmoe_fail(c0, st, "rank %d: %s", (int)r, lmoe_context_last_error(ctx));
      break;
    }
    const lmoe_comm *cm = plans[r].layer->comm;
    if (!cm && n > 1) {
      st = lmoe_fail(c0, LMOE_ERR_INVALID_ARGUMENT, "args[%d]'s layer has no communicator (comm in its config)",
                     (int)r);
    } else if (cm && (cm->size != n || cm->rank != r)) {
      st = lmoe_fail(c0, LMOE_ERR_INVALID_ARGUMENT,
                     "args[%d]'s layer is rank %d of %d; a group of %d forwards takes ranks 0..%d in order", (int)r,
                     (int)cm->rank, (int)cm->size, (int)n, (int)n - 1);
    } else if (cm && r > 0 && cm->group != plans[0].layer->comm->group) {
      st = lmoe_fail(c0, LMOE_ERR_INVALID_ARGUMENT,
                     "args[%d]'s layer belongs to another communicator than args[0]'s", (int)r);
    } else if (cm && cm->ctx != ctx) {
      st = lmoe_fail(c0, LMOE_ERR_INVALID_ARGUMENT, "ctxs[%d] is not the context of args[%d]'s layer", (int)r,
                     (int)r);
    }
  }
  if (st) goto done;
  g = plans[0].layer->comm ? plans[0].layer->comm->group : NULL;
  if (!g) {
#ifdef LMOE_HAVE_NCCL
    if (plans[0].layer->comm && plans[0].layer->comm->nccl) {
      /* every rank's compute first, each leaving its partial by column chunks; then
         chunk by chunk, the ranks' all-reduces as one NCCL group (inside it they are
         only recorded, and ncclGroupEnd enqueues them), each rank's rounding after it */
      for (int32_t r = 0; r < n && !st; r++) {
        lmoe_context *ctx = ctxs[r];
        plans[r].shard_defer = true;
        st = ctx->ops->forward(ctx, &plans[r], rank_stream(ctx, streams, r));
        if (st && ctx != c0) lmoe_fail(c0, st, "rank %d: %s", (int)r, lmoe_context_last_error(ctx));
      }
      int32_t chunks = st ? 0 : c0->ops->shard_chunks(c0);
      for (int32_t r = 1; r < n && !st; r++)
        if (ctxs[r]->ops->shard_chunks(ctxs[r]) != chunks)
          st = lmoe_fail(c0, LMOE_ERR_STATE, "internal: rank %d's sum comes in %d chunks, rank 0's in %d", (int)r,
                         (int)ctxs[r]->ops->shard_chunks(ctxs[r]), (int)chunks);
      for (int32_t c = 0; c < chunks && !st; c++) {
        ncclGroupStart();
        for (int32_t r = 0; r < n && !st; r++)
          st = shard_chunk(c0, ctxs[r], &plans[r], c, 0, rank_stream(ctxs[r], streams, r), r);
        ncclResult_t nr = ncclGroupEnd();
        if (!st && nr != ncclSuccess)
          st = lmoe_fail(c0, LMOE_ERR_BACKEND, "ncclGroupEnd: %s", ncclGetErrorString(nr));
        for (int32_t r = 0; r < n && !st; r++)
          st = shard_chunk(c0, ctxs[r], &plans[r], c, 1, rank_stream(ctxs[r], streams, r), r);
      }
      goto counted;
    }
#endif
    st = lmoe_forward(c0, args[0], streams ? streams[0] : NULL); /* one unsharded rank */
    goto done;
  }
  if (c0->ops->kind != LMOE_BACKEND_CPU) { /* ranks on one device */
    if (!c0->ops->group_forward) {
      st = lmoe_fail(c0, LMOE_ERR_UNSUPPORTED, "the %s backend has no sharded forward", c0->ops->name);
      goto done;
    }
    st = c0->ops->group_forward(n, ctxs, plans, streams);
    goto counted;
  }
  if (!lmoe_comm_group_collect_begin(g)) {
    st = lmoe_fail(c0, LMOE_ERR_STATE, "another forward of this communicator is in progress");
    goto done;
  }
  for (int32_t r = 0; r < n && !st; r++) {
    lmoe_context *ctx = ctxs[r];
    st = ctx->ops->forward(ctx, &plans[r], streams && streams[r] ? streams[r] : ctx->stream);
    if (st && ctx != c0) lmoe_fail(c0, st, "rank %d: %s", (int)r, lmoe_context_last_error(ctx));
  }
  st = lmoe_comm_group_collect_end(g, c0, n, st);
counted:
  /* a failed forward while capturing leaves a graph without its work (as lmoe_forward) */
  for (int32_t r = 0; r < n && st; r++)
    if (ctxs[r]->capturing && !ctxs[r]->capture_failed) ctxs[r]->capture_failed = st;
  for (int32_t r = 0; r < n && !st; r++) {
    ctxs[r]->counters.forwards++;
    if (plans[r].pool && lmoe_meta_active_count(plans[r].meta))
      lmoe_pool_note_use(plans[r].pool, lmoe_meta_active(plans[r].meta), lmoe_meta_active_count(plans[r].meta));
  }
done:
  free(plans);
  return st;
}
