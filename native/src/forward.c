/* Forward: validate arguments, decide on the host whether LoRA work is enqueued,
   hand the plan to the backend. Nothing here waits for the device. */
#include "internal.h"

#include <string.h>


void lmoe_forward_args_init_sized(lmoe_forward_args *a, size_t size) {
  lmoe_forward_args def;
  memset(&def, 0, sizeof def);
  lmoe_struct_init(a, size, &def, sizeof def, LMOE_OLDEST_FORWARD_ARGS);
}

static lmoe_status check_buf(lmoe_context *ctx, const lmoe_buffer *b, const char *name,
                             int32_t dtype_a, int32_t dtype_b, int64_t d0, int64_t d1, bool device) {
  char tmp[96];
  if (!b || b->obj.magic != LMOE_MAGIC_BUFFER)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "%s is %s", name, b ? "not a loramoe buffer" : "NULL");
  if (b->ctx != ctx)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "%s belongs to another context", name);
  if (b->dtype != dtype_a && b->dtype != dtype_b)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "%s has dtype %s; expected %s%s%s", name,
                     lmoe_dtype_name(b->dtype), lmoe_dtype_name(dtype_a),
                     dtype_b != dtype_a ? " or " : "", dtype_b != dtype_a ? lmoe_dtype_name(dtype_b) : "");
  if (b->ndim != 2 || b->shape[0] != d0 || b->shape[1] != d1)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "%s has shape %s; expected [%lld, %lld]", name,
                     lmoe_shape_str(b, tmp, sizeof tmp), (long long)d0, (long long)d1);
  if (device && !lmoe_host_addressable(ctx, LMOE_MEMORY_DEVICE) && b->memory != LMOE_MEMORY_DEVICE)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "%s must be in device memory", name);
  return LMOE_OK;
}

/* Shared by lmoe_forward and lmoe_reference_forward. */
lmoe_status lmoe_forward_validate(lmoe_context *ctx, const lmoe_forward_args *a_in,
                                  lmoe_forward_plan *plan, bool out_is_reference) {
  if (!ctx || ctx->obj.magic != LMOE_MAGIC_CONTEXT) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ctx);
  if (!a_in) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "forward args are NULL");
  /* out, the last field, has no default */
  lmoe_forward_args args;
  lmoe_forward_args_init(&args);
  lmoe_status st = lmoe_struct_in(ctx, &args, sizeof args, LMOE_OLDEST_FORWARD_ARGS, a_in,
                                  "forward args", "lmoe_forward_args_init");
  if (st) return st;
  const lmoe_forward_args *a = &args;
  lmoe_layer *l = a->layer;
  if (!l || l->obj.magic != LMOE_MAGIC_LAYER)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "layer is %s", l ? "not a loramoe layer" : "NULL");
  if (l->ctx != ctx) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "layer belongs to another context");
  const lmoe_batch *b = a->batch;
  if (!b || b->obj.magic != LMOE_MAGIC_BATCH)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "batch is %s", b ? "not a loramoe batch" : "NULL");
  if (b->ctx != ctx) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "batch belongs to another context");
  if (b->unstaged)
    return lmoe_fail(ctx, LMOE_ERR_STATE,
                     "the batch's last lmoe_batch_set failed after it changed the batch: set it again");
  lmoe_pool *p = a->pool;
  if (p && p->obj.magic != LMOE_MAGIC_POOL)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "pool is not a loramoe pool");
  if (p && p->layer != l)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "pool was made for another layer");
  const lmoe_layer_config *c = &l->cfg;
  int64_t M = b->num_tokens;
  if (M > c->max_tokens)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "batch has %lld tokens; the layer was made for at most %d (max_tokens)",
                     (long long)M, (int)c->max_tokens);
  st = check_buf(ctx, a->x, "x", LMOE_DTYPE_BF16, LMOE_DTYPE_BF16, M, c->hidden, true);
  if (st) return st;
  if (out_is_reference)
    st = check_buf(ctx, a->out, "out", LMOE_DTYPE_F32, LMOE_DTYPE_F64, M, c->hidden, false);
  else
    st = check_buf(ctx, a->out, "out", LMOE_DTYPE_BF16, LMOE_DTYPE_BF16, M, c->hidden, true);
  if (st) return st;
  if (!out_is_reference && a->out == a->x)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "out must not be x (no in-place forward)");
  if (a->router_logits) {
    if (a->topk_ids || a->topk_weights)
      return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                       "give router_logits or topk_ids with topk_weights, not both");
    st = check_buf(ctx, a->router_logits, "router_logits", LMOE_DTYPE_F32, LMOE_DTYPE_BF16, M,
                   c->num_experts, true);
  } else {
    if (!a->topk_ids || !a->topk_weights)
      return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                       "routing is missing: give router_logits, or topk_ids and topk_weights");
    st = check_buf(ctx, a->topk_ids, "topk_ids", LMOE_DTYPE_I32, LMOE_DTYPE_I32, M, c->top_k, true);
    if (!st)
      st = check_buf(ctx, a->topk_weights, "topk_weights", LMOE_DTYPE_F32, LMOE_DTYPE_F32, M, c->top_k,
                     true);
  }
  if (st) return st;

  /* The batch's facts are its own (lmoe_batch_set); what may have changed since is
     the pool: a slot unloaded, or the pool not given at all. O(active slots). */
  st = lmoe_batch_check_pool(b, p);
  if (st) return st;
  memset(plan, 0, sizeof *plan);
  plan->layer = l;
  plan->pool = p;
  plan->batch = b;
  plan->M = M;
  plan->x = a->x;
  plan->logits = a->router_logits;
  plan->topk_ids = a->topk_ids;
  plan->topk_w = a->topk_weights;
  plan->out = a->out;
  plan->meta = b->meta;
  plan->guard = ctx->guard;
  switch (ctx->guard) {
  case LMOE_GUARD_HOST: plan->run_lora = lmoe_meta_active_count(b->meta) > 0; break;
  case LMOE_GUARD_ALWAYS: plan->run_lora = p != NULL; break;
  default: plan->run_lora = false; break; /* device_sync: the backend decides after its wait */
  }
  return LMOE_OK;
}

/* A sharded layer's rank whose forward is refused still joins the sum over the ranks
   (cpu communicators), so the other ranks return instead of waiting for it. Only when
   the arguments name a sharded layer of this context; else there is nothing to join. */
static void join_failed(lmoe_context *ctx, const lmoe_forward_args *a) {
  if (!lmoe_object_is(ctx, LMOE_MAGIC_CONTEXT) || !a ||
      a->struct_size < LMOE_FIELD_END(lmoe_forward_args, layer) || !lmoe_object_is(a->layer, LMOE_MAGIC_LAYER))
    return;
  lmoe_layer *l = a->layer;
  if (l->ctx != ctx || !l->comm || !l->comm->group || l->cfg.shard_size < 2 ||
      ctx->ops->kind != LMOE_BACKEND_CPU) /* a device group's ranks never wait for each other */
    return;
  char keep[LMOE_ERRBUF];
  memcpy(keep, ctx->error, sizeof keep);
  lmoe_comm_cpu_allreduce(l->comm, ctx, NULL, 0, 0, 0, NULL, true);
  memcpy(ctx->error, keep, sizeof keep); /* the refusal is the message */
}

lmoe_status lmoe_forward(lmoe_context *ctx, const lmoe_forward_args *args, void *stream) {
  lmoe_forward_plan plan;
  lmoe_status st = lmoe_forward_validate(ctx, args, &plan, false);
  if (st) join_failed(ctx, args);
  if (!st && plan.layer->comm && plan.layer->comm->group && plan.layer->comm->size > 1 &&
      ctx->ops->kind != LMOE_BACKEND_CPU)
    st = lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                   "the layer is rank %d of %d ranks on one %s device (lmoe_comm_create_local without NCCL "
                   "between them): their forwards run together, through lmoe_forward_group",
                   (int)plan.layer->comm->rank, (int)plan.layer->comm->size, ctx->ops->name);
  if (!st) st = ctx->ops->forward(ctx, &plan, stream ? stream : ctx->stream);
  /* A forward that failed while capturing leaves a graph without its work: the
     capture's end refuses it (graph.c). */
  if (st && ctx && ctx->obj.magic == LMOE_MAGIC_CONTEXT && ctx->capturing && !ctx->capture_failed)
    ctx->capture_failed = st;
  if (st) return st;
  if (!st) ctx->counters.forwards++;
  if (!st && plan.pool && lmoe_meta_active_count(plan.meta))
    lmoe_pool_note_use(plan.pool, lmoe_meta_active(plan.meta), lmoe_meta_active_count(plan.meta));
  return st;
}
