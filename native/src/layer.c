/* MoE layer: expert weights and the workspace they need. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

void lmoe_layer_config_init(lmoe_layer_config *cfg) {
  if (!cfg) return;
  memset(cfg, 0, sizeof *cfg);
  cfg->struct_size = sizeof *cfg;
  cfg->top_k = 2;
  cfg->renormalize = 1;
  cfg->max_tokens = 8192;
}

static void layer_destroy(lmoe_object *obj) {
  lmoe_layer *l = (lmoe_layer *)obj;
  lmoe_context *ctx = l->ctx;
  lmoe_buffer_release(l->w13);
  lmoe_buffer_release(l->w2);
  free(l);
  lmoe_context_release(ctx);
}

lmoe_status lmoe_layer_create(lmoe_context *ctx, const lmoe_layer_config *cfg_in, lmoe_layer **out) {
  if (!ctx || ctx->obj.magic != LMOE_MAGIC_CONTEXT) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(ctx);
  if (!out) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "out is NULL");
  *out = NULL;
  if (!cfg_in) return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "layer config is NULL");
  /* E, H and I have no default; top_k, renormalize and max_tokens do */
  lmoe_layer_config cfg;
  lmoe_layer_config_init(&cfg);
  lmoe_status st = lmoe_struct_in(ctx, &cfg, sizeof cfg, LMOE_FIELD_END(lmoe_layer_config, intermediate), cfg_in,
                                  "layer config", "lmoe_layer_config_init");
  if (st) return st;
  if (cfg.num_experts < 1 || cfg.num_experts > 4096)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "num_experts must be 1..4096, got %d",
                     (int)cfg.num_experts);
  if (cfg.hidden < 1 || cfg.hidden > 65536 || cfg.intermediate < 1 || cfg.intermediate > 65536)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT,
                     "hidden and intermediate must be 1..65536, got %d and %d", (int)cfg.hidden,
                     (int)cfg.intermediate);
  if (cfg.top_k < 1 || cfg.top_k > cfg.num_experts || cfg.top_k > 32)
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "top_k must be 1..min(num_experts, 32), got %d",
                     (int)cfg.top_k);
  if (cfg.max_tokens < 1 || cfg.max_tokens > (1 << 24))
    return lmoe_fail(ctx, LMOE_ERR_INVALID_ARGUMENT, "max_tokens must be 1..16777216, got %d",
                     (int)cfg.max_tokens);
  cfg.renormalize = cfg.renormalize ? 1 : 0;

  lmoe_layer *l = calloc(1, sizeof *l);
  if (!l) return lmoe_fail(ctx, LMOE_ERR_OUT_OF_MEMORY, "out of host memory");
  lmoe_object_init(&l->obj, LMOE_MAGIC_LAYER, layer_destroy);
  l->cfg = cfg;
  int64_t s13[3] = {cfg.num_experts, 2 * (int64_t)cfg.intermediate, cfg.hidden};
  int64_t s2[3] = {cfg.num_experts, cfg.hidden, cfg.intermediate};
  st = lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 3, s13, &l->w13);
  if (!st) st = lmoe_buffer_create(ctx, LMOE_DTYPE_BF16, LMOE_MEMORY_DEVICE, 3, s2, &l->w2);
  if (!st) st = lmoe_context_reserve(ctx, &cfg, NULL);
  if (st) {
    lmoe_buffer_release(l->w13);
    lmoe_buffer_release(l->w2);
    free(l);
    return st;
  }
  lmoe_context_retain(ctx);
  l->ctx = ctx;
  *out = l;
  return LMOE_OK;
}

void lmoe_layer_release(lmoe_layer *l) {
  if (lmoe_object_is(l, LMOE_MAGIC_LAYER)) lmoe_object_release(&l->obj);
}

lmoe_status lmoe_layer_get_config(const lmoe_layer *l, lmoe_layer_config *out) {
  if (!l || !out || l->obj.magic != LMOE_MAGIC_LAYER) return LMOE_ERR_INVALID_ARGUMENT;
  *out = l->cfg;
  return LMOE_OK;
}

static bool valid_layer(const lmoe_layer *l) { return l && l->obj.magic == LMOE_MAGIC_LAYER; }

lmoe_status lmoe_layer_set_weights(lmoe_layer *l, const void *w13, const void *w2, int32_t dtype) {
  if (!valid_layer(l)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(l->ctx);
  if (!lmoe_valid_dtype(dtype) || dtype == LMOE_DTYPE_I32)
    return lmoe_fail(l->ctx, LMOE_ERR_INVALID_ARGUMENT, "weights dtype must be bf16, f16, f32 or f64");
  lmoe_status st = LMOE_OK;
  if (w13) st = lmoe_buffer_write(l->w13, 0, w13, dtype, l->w13->numel);
  if (!st && w2) st = lmoe_buffer_write(l->w2, 0, w2, dtype, l->w2->numel);
  return st;
}

lmoe_status lmoe_layer_set_expert(lmoe_layer *l, int32_t e, const void *gate, const void *up,
                                  const void *down, int32_t dtype) {
  if (!valid_layer(l)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(l->ctx);
  const lmoe_layer_config *c = &l->cfg;
  if (e < 0 || e >= c->num_experts)
    return lmoe_fail(l->ctx, LMOE_ERR_INVALID_ARGUMENT, "expert %d is out of range 0..%d", (int)e,
                     (int)c->num_experts - 1);
  if (!lmoe_valid_dtype(dtype) || dtype == LMOE_DTYPE_I32)
    return lmoe_fail(l->ctx, LMOE_ERR_INVALID_ARGUMENT, "weights dtype must be bf16, f16, f32 or f64");
  int64_t ih = (int64_t)c->intermediate * c->hidden;
  lmoe_status st = LMOE_OK;
  if (gate) st = lmoe_buffer_write(l->w13, (int64_t)e * 2 * ih, gate, dtype, ih);
  if (!st && up) st = lmoe_buffer_write(l->w13, (int64_t)e * 2 * ih + ih, up, dtype, ih);
  if (!st && down) st = lmoe_buffer_write(l->w2, (int64_t)e * ih, down, dtype, ih);
  return st;
}

lmoe_status lmoe_layer_randomize(lmoe_layer *l, uint64_t seed, float scale) {
  if (!valid_layer(l)) return LMOE_ERR_INVALID_ARGUMENT;
  lmoe_clear_error(l->ctx);
  if (!(scale >= 0))
    return lmoe_fail(l->ctx, LMOE_ERR_INVALID_ARGUMENT, "scale must be >= 0");
  lmoe_status st = lmoe_buffer_fill_random(l->w13, lmoe_mix64(seed * 2 + 1), -scale, scale, NULL);
  if (!st) st = lmoe_buffer_fill_random(l->w2, lmoe_mix64(seed * 2 + 2), -scale, scale, NULL);
  return st;
}

lmoe_status lmoe_layer_weights(lmoe_layer *l, int32_t which, lmoe_buffer **out) {
  if (!valid_layer(l) || !out) return LMOE_ERR_INVALID_ARGUMENT;
  if (which != 0 && which != 1)
    return lmoe_fail(l->ctx, LMOE_ERR_INVALID_ARGUMENT, "which must be 0 (W13) or 1 (W2)");
  *out = which == 0 ? l->w13 : l->w2;
  return LMOE_OK;
}
